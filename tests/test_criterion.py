"""SetCriterion: golden parity (both families), hand-computed losses, empty targets, builder."""

import math

import pytest
import torch
from conftest import load_golden
from detectron2.config import get_cfg
from test_matcher import (
    HAND_LOGITS,
    HAND_MASKS,
    HAND_TARGET_2X2,
    LEVELS,
    SCENARIOS,
    RandReplay,
    assert_indices_equal,
    random_batch,
    scenario,
    sigmoid,
    softplus,
)

import mask_former.modeling.criterion as criterion_module
from mask_former.config import add_mask_former_config
from mask_former.modeling.criterion import SetCriterion, build_criterion
from mask_former.modeling.matcher import HungarianMatcher

FAMILIES = {"MaskFormer": "criterion_maskformer.pt", "Mask2Former": "criterion_mask2former.pt"}


# The references were recorded at 1 thread (bit-exact there); it is also the fastest here.
pytestmark = pytest.mark.usefixtures("one_thread")


def golden_criterion(family, num_points=None):
    """Builds the criterion of a golden file through ``build_criterion`` and the file's cfg."""
    golden = load_golden(FAMILIES[family])
    cfg = get_cfg()
    add_mask_former_config(cfg)
    for key, value in golden["cfg"].items():
        cfg.merge_from_list([key, value])
    if num_points is not None:
        cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = num_points
    return golden, build_criterion(cfg, golden["num_classes"], family)


def record_matching(monkeypatch, criterion):
    """Records the cost matrices and indices of every matcher call made by ``criterion``."""
    record = {"costs": [], "indices": []}
    compute_costs, forward = criterion.matcher.compute_costs, criterion.matcher.forward

    def recording_costs(outputs, targets):
        record["costs"].append(compute_costs(outputs, targets))
        return record["costs"][-1]

    def recording_forward(outputs, targets):
        record["indices"].append(forward(outputs, targets))
        return record["indices"][-1]

    monkeypatch.setattr(criterion.matcher, "compute_costs", recording_costs)
    monkeypatch.setattr(criterion.matcher, "forward", recording_forward)
    return record


def assert_losses_close(ours, expected, rel=1e-5):
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert math.isclose(float(ours[key]), value, rel_tol=rel, abs_tol=1e-7), (key, ours[key])


def assert_matching(record, expected_costs, expected_indices):
    for level, costs, indices in zip(LEVELS, record["costs"], record["indices"]):
        for cost, exp in zip(costs, expected_costs[level]):
            torch.testing.assert_close(cost, exp, atol=1e-5, rtol=0)
        assert_indices_equal(indices, expected_indices[level])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_build_criterion_matches_golden_config(family):
    golden, criterion = golden_criterion(family)
    assert criterion.weight_dict == golden["weight_dict"]
    assert criterion.losses == golden["losses_list"]
    assert torch.equal(criterion.state_dict()["empty_weight"], golden["empty_weight"])
    costs = golden["matcher_costs"]
    matcher = criterion.matcher
    assert (matcher.cost_class, matcher.cost_mask, matcher.cost_dice) == (
        costs["cost_class"],
        costs["cost_mask"],
        costs["cost_dice"],
    )
    assert matcher.num_points == criterion.num_points == (0 if family == "MaskFormer" else 384)


@pytest.mark.parametrize("name", SCENARIOS)
def test_maskformer_golden(name, monkeypatch):
    golden, criterion = golden_criterion("MaskFormer")
    case = scenario(golden, name)
    record = record_matching(monkeypatch, criterion)
    with torch.no_grad():
        losses = criterion(golden["outputs"], case["targets"])
    assert_losses_close(losses, case["losses"])
    weighted = {k: float(v) * criterion.weight_dict[k] for k, v in losses.items()}
    assert_losses_close(weighted, case["weighted_losses"])
    assert_matching(record, case["cost_matrices"], case["indices"])
    assert criterion._num_masks(case["targets"], torch.device("cpu")) == case["num_masks"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_mask2former_replay_p384(name, monkeypatch):
    golden, criterion = golden_criterion("Mask2Former")
    case = scenario(golden, name)
    seeded = case["seeded_P384"]
    replay = RandReplay(seeded["rand_call_log"])
    monkeypatch.setattr(torch, "rand", replay)
    record = record_matching(monkeypatch, criterion)
    coords = []
    sample = criterion_module.get_uncertain_point_coords_with_randomness

    def recording_sample(*args):
        coords.append(sample(*args))
        return coords[-1]

    monkeypatch.setattr(
        criterion_module, "get_uncertain_point_coords_with_randomness", recording_sample
    )
    with torch.no_grad():
        losses = criterion(golden["outputs"], case["targets"])
    replay.assert_exhausted()
    assert_losses_close(losses, seeded["losses"])
    weighted = {k: float(v) * criterion.weight_dict[k] for k, v in losses.items()}
    assert_losses_close(weighted, seeded["weighted_losses"])
    assert_matching(record, seeded["cost_matrices_in_criterion"], seeded["indices_in_criterion"])
    for level, level_coords in zip(LEVELS, coords):
        assert torch.equal(level_coords, seeded["loss_point_coords"][level])
    assert criterion._num_masks(case["targets"], torch.device("cpu")) == case["num_masks"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_mask2former_seeded_p12544(name):
    """Our draws have the reference's order and shapes, so ``manual_seed(0)`` reproduces it."""
    golden, criterion = golden_criterion("Mask2Former", num_points=12544)
    case = scenario(golden, name)
    torch.manual_seed(0)
    with torch.no_grad():
        losses = criterion(golden["outputs"], case["targets"])
    assert_losses_close(losses, case["seeded_P12544"]["losses"])


@pytest.mark.parametrize("num_points", [384, 12544])
@pytest.mark.parametrize("name", SCENARIOS)
def test_mask2former_statistics(name, num_points):
    """Mean over the 50 recorded seeds within 4 standard errors of the reference mean."""
    golden, criterion = golden_criterion("Mask2Former", num_points=num_points)
    case = scenario(golden, name)
    stats = case[f"stats_P{num_points}"]
    per_seed = {key: [] for key in stats["mean"]}
    for seed in stats["seeds"]:
        torch.manual_seed(seed)
        with torch.no_grad():
            losses = criterion(golden["outputs"], case["targets"])
        for key, value in losses.items():
            per_seed[key].append(float(value))
    num_seeds = len(stats["seeds"])
    for key, values in per_seed.items():
        mean = sum(values) / num_seeds
        if key.startswith("loss_ce"):
            assert all(v == pytest.approx(stats["mean"][key], rel=1e-6) for v in values), key
            continue
        bound = 4 * stats["std"][key] * math.sqrt(2 / num_seeds)
        assert abs(mean - stats["mean"][key]) <= bound, (key, mean, stats["mean"][key], bound)


def hand_targets():
    return [{"labels": torch.tensor([1]), "masks": torch.tensor([HAND_TARGET_2X2]).bool()}]


def make_criterion(num_points, num_classes=2, **kwargs):
    """A criterion with unit matching costs and ``eos_coef`` 0.1."""
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=1.0, cost_dice=1.0, num_points=num_points)
    losses = ["labels", "masks"]
    return SetCriterion(num_classes, matcher, {}, 0.1, losses, num_points=num_points, **kwargs)


def hand_loss_ce(matched_query, label):
    """Cross-entropy weighted by [1, 1, 0.1]: the other query's target is "no object" (2)."""
    weights = [1.0, 1.0, 0.1]
    total, weight_sum = 0.0, 0.0
    for query, logits in enumerate(HAND_LOGITS):
        target = label if query == matched_query else 2
        nll = math.log(sum(math.exp(v) for v in logits)) - logits[target]
        total += weights[target] * nll
        weight_sum += weights[target]
    return total / weight_sum


def hand_mask_values(query):
    xs = [x for row in HAND_MASKS[query] for x in row]
    ts = [t for row in HAND_TARGET_2X2 for t in row]
    return xs, ts


def test_maskformer_losses_by_hand():
    # The losses are those of the pair the matcher picks (checked in test_matcher), num_masks 1.
    outputs = {"pred_logits": torch.tensor([HAND_LOGITS]), "pred_masks": torch.tensor([HAND_MASKS])}
    criterion = make_criterion(num_points=0)
    indices = criterion.matcher(outputs, hand_targets())
    query = int(indices[0][0])
    xs, ts = hand_mask_values(query)
    focal = sum(
        (0.25 * t + 0.75 * (1 - t))
        * (t * softplus(-x) + (1 - t) * softplus(x))
        * (1 - (sigmoid(x) * t + (1 - sigmoid(x)) * (1 - t))) ** 2
        for x, t in zip(xs, ts)
    ) / len(xs)
    ps = [sigmoid(x) for x in xs]
    dice = 1 - (2 * sum(p * t for p, t in zip(ps, ts)) + 1) / (sum(ps) + sum(ts) + 1)
    losses = criterion(outputs, hand_targets())
    assert losses["loss_ce"].item() == pytest.approx(hand_loss_ce(query, 1), rel=1e-6)
    assert losses["loss_mask"].item() == pytest.approx(focal, rel=1e-6)
    assert losses["loss_dice"].item() == pytest.approx(dice, rel=1e-6)


def test_mask2former_losses_by_hand(monkeypatch):
    # Every draw returns the 4 pixel centres, which sample the 2x2 masks exactly. With
    # oversample 1 and importance 1 the 4 candidates are all kept (in topk order, which the mean
    # does not depend on) and no random points are added.
    centres = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    monkeypatch.setattr(torch, "rand", lambda *size, **kw: centres.expand(size[0], 4, 2).clone())
    outputs = {"pred_logits": torch.tensor([HAND_LOGITS]), "pred_masks": torch.tensor([HAND_MASKS])}
    criterion = make_criterion(num_points=4, oversample_ratio=1.0, importance_sample_ratio=1.0)
    query = int(criterion.matcher(outputs, hand_targets())[0][0])
    xs, ts = hand_mask_values(query)
    bce = sum(t * softplus(-x) + (1 - t) * softplus(x) for x, t in zip(xs, ts)) / len(xs)
    ps = [sigmoid(x) for x in xs]
    dice = 1 - (2 * sum(p * t for p, t in zip(ps, ts)) + 1) / (sum(ps) + sum(ts) + 1)
    losses = criterion(outputs, hand_targets())
    assert losses["loss_ce"].item() == pytest.approx(hand_loss_ce(query, 1), rel=1e-6)
    assert losses["loss_mask"].item() == pytest.approx(bce, rel=1e-6)
    assert losses["loss_dice"].item() == pytest.approx(dice, rel=1e-6)


def with_aux(outputs, num_aux=2):
    """Adds ``num_aux`` aux levels (scaled copies) to random outputs; all leaves require grad."""
    leaves = {k: v.clone().requires_grad_() for k, v in outputs.items()}
    aux = [
        {k: (v * (0.5 + i)).detach().requires_grad_() for k, v in leaves.items()}
        for i in range(num_aux)
    ]
    return {**leaves, "aux_outputs": aux}


@pytest.mark.parametrize("num_points", [0, 30])
@pytest.mark.parametrize("counts", [[3, 0], [0, 0], [2, 4]])
def test_backward_and_empty_targets(counts, num_points):
    outputs, targets = random_batch(counts, [(48, 64), (48, 64)])
    outputs = with_aux(outputs)
    criterion = make_criterion(num_points, num_classes=4)
    losses = criterion(outputs, targets)
    expected_keys = {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    assert set(losses) == expected_keys
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    if sum(counts) == 0:
        assert all(losses[k].item() == 0.0 for k in expected_keys if not k.startswith("loss_ce"))
    sum(losses.values()).backward()
    leaves = [outputs["pred_logits"], outputs["pred_masks"]]
    leaves += [v for aux in outputs["aux_outputs"] for v in aux.values()]
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    # Mask losses reach the masks only through matched queries.
    assert bool(outputs["pred_masks"].grad.abs().sum() > 0) == (sum(counts) > 0)
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_targets_of_different_sizes_are_zero_padded():
    outputs, targets = random_batch([2, 3], [(40, 64), (48, 56)])
    padded = [
        {
            "labels": t["labels"],
            "masks": torch.nn.functional.pad(t["masks"], (0, 64 - w, 0, 48 - h)),
        }
        for t, (h, w) in zip(targets, [(40, 64), (48, 56)])
    ]
    criterion = make_criterion(num_points=0, num_classes=4)
    # Matching is done at prediction resolution per image, so pad before comparing losses only.
    indices = criterion.matcher(outputs, padded)
    ours = criterion.loss_masks(outputs, targets, indices, 5.0)
    expected = criterion.loss_masks(outputs, padded, indices, 5.0)
    for key in ("loss_mask", "loss_dice"):
        torch.testing.assert_close(ours[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("bad_label", [5, -2])
def test_bad_label_raises(bad_label):
    outputs, targets = random_batch([2], [(8, 8)])
    targets[0]["labels"][1] = bad_label
    criterion = build_criterion(_cfg(), num_classes=5, family="MaskFormer")
    with pytest.raises(ValueError, match=rf"{bad_label}.*num_classes=5"):
        criterion(outputs, targets)


def test_num_masks_averaged_over_workers(monkeypatch):
    criterion = build_criterion(_cfg(), num_classes=5, family="MaskFormer")
    targets = [{"labels": torch.tensor([0, 1, 2])}, {"labels": torch.tensor([3])}]
    # A second worker with 6 segments: (4 + 6) / 2.
    monkeypatch.setattr(criterion_module.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(6))
    assert criterion._num_masks(targets, torch.device("cpu")) == 5.0
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t)
    assert criterion._num_masks([{"labels": torch.tensor([0])}], torch.device("cpu")) == 1.0


def _cfg(**overrides):
    cfg = get_cfg()
    add_mask_former_config(cfg)
    for key, value in overrides.items():
        cfg.MODEL.MASK_FORMER[key] = value
    return cfg


def test_build_criterion_families():
    cfg = _cfg(
        CLASS_WEIGHT=2.0, MASK_WEIGHT=5.0, DICE_WEIGHT=5.0, DEC_LAYERS=4, TRAIN_NUM_POINTS=99
    )
    mf = build_criterion(cfg, 7, "MaskFormer")
    assert mf.weight_dict["loss_ce"] == mf.matcher.cost_class == 1.0
    assert mf.num_points == mf.matcher.num_points == 0
    assert sorted(mf.weight_dict) == sorted(
        f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1", "_2")
    )
    m2f = build_criterion(cfg, 7, "Mask2Former")
    assert m2f.weight_dict["loss_ce_2"] == m2f.matcher.cost_class == 2.0
    assert m2f.num_points == m2f.matcher.num_points == 99
    assert m2f.empty_weight.tolist() == pytest.approx([1.0] * 7 + [0.1])
    assert "empty_weight" in m2f.state_dict()
    no_aux = build_criterion(_cfg(DEEP_SUPERVISION=False), 7, "Mask2Former")
    assert sorted(no_aux.weight_dict) == ["loss_ce", "loss_dice", "loss_mask"]
    with pytest.raises(ValueError, match="family"):
        build_criterion(cfg, 7, "DETR")
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(7, mf.matcher, {}, 0.1, ["labels", "boxes"])
