"""HungarianMatcher: golden parity (both families), hand-computed costs, batching, empty targets."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import load_golden

from mask_former.modeling.matcher import (
    HungarianMatcher,
    batch_dice_cost,
    batch_sigmoid_ce_cost,
    batch_sigmoid_focal_cost,
    check_target_labels,
)

LEVELS = ("final", "aux_0", "aux_1")
SCENARIOS = ("main", "both_nonempty")


class RandReplay:
    """Stands in for ``torch.rand``: returns recorded draws in order, checking each shape."""

    def __init__(self, log):
        self.log = list(log)

    def __call__(self, *size, **kwargs):
        assert self.log, f"unexpected extra torch.rand{size}"
        entry = self.log.pop(0)
        assert list(size) == list(entry["shape"]), f"torch.rand{size}, recorded {entry['shape']}"
        return entry["values"].clone().to(kwargs.get("device", "cpu"))

    def assert_exhausted(self):
        assert not self.log, f"{len(self.log)} recorded draws were not replayed"


# The references were recorded at 1 thread (bit-exact there); it is also the fastest here.
pytestmark = pytest.mark.usefixtures("one_thread")


def scenario(golden, name):
    return golden if name == "main" else golden["scenario_both_nonempty"]


def level_outputs(outputs, level):
    if level == "final":
        return {k: v for k, v in outputs.items() if k != "aux_outputs"}
    return outputs["aux_outputs"][int(level.split("_")[1])]


def assert_indices_equal(ours, expected):
    assert len(ours) == len(expected)
    for (src, tgt), (exp_src, exp_tgt) in zip(ours, expected):
        assert src.dtype == tgt.dtype == torch.int64
        assert torch.equal(src, exp_src) and torch.equal(tgt, exp_tgt), (src, tgt, exp_src, exp_tgt)


def assert_costs_close(ours, expected):
    assert len(ours) == len(expected)
    for cost, exp in zip(ours, expected):
        assert cost.dtype == torch.float32 and cost.device.type == "cpu"
        assert cost.shape == exp.shape
        torch.testing.assert_close(cost, exp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", SCENARIOS)
def test_maskformer_matcher_golden(name):
    golden = load_golden("criterion_maskformer.pt")
    case = scenario(golden, name)
    matcher = HungarianMatcher(**golden["matcher_costs"])
    for level in LEVELS:
        outputs = level_outputs(golden["outputs"], level)
        assert_indices_equal(
            matcher(outputs, case["targets"]), case["indices_matcher_alone"][level]
        )
        assert_costs_close(
            matcher.compute_costs(outputs, case["targets"]), case["cost_matrices"][level]
        )


@pytest.mark.parametrize("name", SCENARIOS)
def test_mask2former_matcher_replay_p384(name, monkeypatch):
    golden = load_golden("criterion_mask2former.pt")
    case = scenario(golden, name)["matcher_alone_P384"]
    targets = scenario(golden, name)["targets"]
    matcher = HungarianMatcher(**golden["matcher_costs"], num_points=384)
    for level in LEVELS:
        replay = RandReplay(case["rand_call_log"][level])
        monkeypatch.setattr(torch, "rand", replay)
        costs = matcher.compute_costs(level_outputs(golden["outputs"], level), targets)
        replay.assert_exhausted()
        replay = RandReplay(case["rand_call_log"][level])
        monkeypatch.setattr(torch, "rand", replay)
        indices = matcher(level_outputs(golden["outputs"], level), targets)
        replay.assert_exhausted()
        assert_costs_close(costs, case["cost_matrices"][level])
        assert_indices_equal(indices, case["indices"][level])


@pytest.mark.parametrize("name", SCENARIOS)
def test_mask2former_matcher_seeded_p12544(name):
    """Same draws as the reference (one rand(1, P, 2) per image), so seeding reproduces it."""
    golden = load_golden("criterion_mask2former.pt")
    case = scenario(golden, name)["matcher_alone_P12544"]
    targets = scenario(golden, name)["targets"]
    matcher = HungarianMatcher(**golden["matcher_costs"], num_points=12544)
    for level in LEVELS:
        outputs = level_outputs(golden["outputs"], level)
        torch.manual_seed(0)
        costs = matcher.compute_costs(outputs, targets)
        torch.manual_seed(0)
        indices = matcher(outputs, targets)
        assert_costs_close(costs, case["cost_matrices"][level])
        assert_indices_equal(indices, case["indices"][level])


def softplus(x):
    return math.log1p(math.exp(x))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# One image, two queries, classes {0, 1} + no object, 2x2 mask logits.
HAND_LOGITS = [[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]]
HAND_MASKS = [[[3.0, -2.0], [-1.0, 0.5]], [[-3.0, 2.0], [1.0, -0.5]]]
HAND_TARGET_2X2 = [[1.0, 0.0], [0.0, 1.0]]


def hand_outputs():
    return {"pred_logits": torch.tensor([HAND_LOGITS]), "pred_masks": torch.tensor([HAND_MASKS])}


def hand_class_cost(query, label):
    exps = [math.exp(v) for v in HAND_LOGITS[query]]
    return -exps[label] / sum(exps)


def hand_dice(query):
    xs = [x for row in HAND_MASKS[query] for x in row]
    ts = [t for row in HAND_TARGET_2X2 for t in row]
    ps = [sigmoid(x) for x in xs]
    return 1 - (2 * sum(p * t for p, t in zip(ps, ts)) + 1) / (sum(ps) + sum(ts) + 1)


def hand_focal(query):
    xs = [x for row in HAND_MASKS[query] for x in row]
    ts = [t for row in HAND_TARGET_2X2 for t in row]
    terms = [
        t * 0.25 * (1 - sigmoid(x)) ** 2 * softplus(-x)
        + (1 - t) * 0.75 * sigmoid(x) ** 2 * softplus(x)
        for x, t in zip(xs, ts)
    ]
    return sum(terms) / len(terms)


def hand_bce(query):
    xs = [x for row in HAND_MASKS[query] for x in row]
    ts = [t for row in HAND_TARGET_2X2 for t in row]
    terms = [t * softplus(-x) + (1 - t) * softplus(x) for x, t in zip(xs, ts)]
    return sum(terms) / len(terms)


def test_maskformer_cost_by_hand():
    # A 4x4 target whose nearest 2x2 downsample (rows/cols 0 and 2) is HAND_TARGET_2X2; the pixel
    # at (1, 1) is not sampled and must not count.
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[0, 0, 0] = target[0, 2, 2] = target[0, 1, 1] = True
    matcher = HungarianMatcher(cost_class=1.5, cost_mask=20.0, cost_dice=2.0)
    targets = [{"labels": torch.tensor([1]), "masks": target}]
    (cost,) = matcher.compute_costs(hand_outputs(), targets)
    expected = [
        20.0 * hand_focal(q) + 1.5 * hand_class_cost(q, 1) + 2.0 * hand_dice(q) for q in (0, 1)
    ]
    torch.testing.assert_close(
        cost, torch.tensor([[expected[0]], [expected[1]]]), atol=1e-6, rtol=0
    )
    ((src, tgt),) = matcher(hand_outputs(), targets)
    assert src.tolist() == [expected.index(min(expected))] and tgt.tolist() == [0]


def test_mask2former_cost_by_hand(monkeypatch):
    # Points at the 4 pixel centres sample the 2x2 masks exactly.
    centres = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]])
    monkeypatch.setattr(torch, "rand", RandReplay([{"shape": [1, 4, 2], "values": centres}]))
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=4)
    targets = [{"labels": torch.tensor([0]), "masks": torch.tensor([HAND_TARGET_2X2]).bool()}]
    (cost,) = matcher.compute_costs(hand_outputs(), targets)
    expected = [
        5.0 * hand_bce(q) + 2.0 * hand_class_cost(q, 0) + 5.0 * hand_dice(q) for q in (0, 1)
    ]
    torch.testing.assert_close(
        cost, torch.tensor([[expected[0]], [expected[1]]]), atol=1e-6, rtol=0
    )


def plain_cross_entropies(x):
    """The published form: BCE with logits against constant target tensors."""
    pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    return pos, neg


def plain_focal_cost(x, t, alpha=0.25, gamma=2.0):
    prob = x.sigmoid()
    pos, neg = plain_cross_entropies(x)
    pos, neg = (1 - prob) ** gamma * pos, prob**gamma * neg
    return ((pos * alpha) @ t.t() + (neg * (1 - alpha)) @ (1 - t).t()) / x.shape[1]


def plain_ce_cost(x, t):
    pos, neg = plain_cross_entropies(x)
    return (pos @ t.t() + neg @ (1 - t).t()) / x.shape[1]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Runs a test at 1 and at 2 threads, restoring the thread count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_costs_equal_the_plain_formulas_bit_for_bit(threads):
    # The costs compute log_sigmoid once and update temporaries in place; same values to the bit.
    gen = torch.Generator().manual_seed(3)
    x = 4 * torch.randn(7, 300, generator=gen)
    x[0, :8] = torch.tensor([0.0, -0.0, 30.0, -30.0, 100.0, -100.0, 1e4, -1e4])
    t = (torch.rand(3, 300, generator=gen) > 0.6).float()
    assert torch.equal(batch_sigmoid_focal_cost(x, t), plain_focal_cost(x, t))
    assert torch.equal(batch_sigmoid_focal_cost(x, t, 0.5, 3.0), plain_focal_cost(x, t, 0.5, 3.0))
    assert torch.equal(batch_sigmoid_ce_cost(x, t), plain_ce_cost(x, t))
    # The matcher's MaskFormer cost (shared sigmoid) against the costs assembled plainly.
    outputs, targets = random_batch([2], [(12, 16)], seed=4)
    matcher = HungarianMatcher(cost_class=1.5, cost_mask=20.0, cost_dice=2.0)
    (cost,) = matcher.compute_costs(outputs, targets)
    logits = outputs["pred_masks"][0].flatten(1)
    masks = targets[0]["masks"].float().flatten(1)
    class_cost = -outputs["pred_logits"][0].softmax(-1)[:, targets[0]["labels"]]
    expected = (
        20.0 * plain_focal_cost(logits, masks)
        + 1.5 * class_cost
        + 2.0 * batch_dice_cost(logits, masks)
    )
    assert torch.equal(cost, expected)


def test_batched_costs_equal_the_plain_per_image_formulas_bit_for_bit(threads):
    # The published matcher computes each image's costs on its own. Ours too: a matrix product
    # over all the batch's targets rounded differently (~5e-6 relative at these sizes).
    outputs, targets = random_batch([5, 0, 12, 9], [(216, 320), (8, 8), (216, 320), (200, 300)])
    gen = torch.Generator().manual_seed(6)
    outputs["pred_masks"] = 3 * torch.randn(4, 6, 54, 80, generator=gen)
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0)
    costs = matcher.compute_costs(outputs, targets)
    assert [c.shape for c in costs] == [(6, 5), (6, 0), (6, 12), (6, 9)]
    for b, (cost, target) in enumerate(zip(costs, targets)):
        if not len(target["labels"]):
            continue
        logits = outputs["pred_masks"][b].flatten(1)
        masks = F.interpolate(target["masks"][:, None].float(), size=(54, 80), mode="nearest")
        masks = masks.flatten(1)
        class_cost = -outputs["pred_logits"][b].softmax(-1)[:, target["labels"]]
        expected = (
            20.0 * plain_focal_cost(logits, masks) + class_cost + batch_dice_cost(logits, masks)
        )
        assert torch.equal(cost, expected), (b, (cost - expected).abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mask2former_matcher_under_autocast_samples_in_float32(dtype):
    # Under AMP (all published M2F configs) the predictions are half precision. The published
    # matcher samples them with autocast on, where grid_sample promotes them to float32: the
    # costs equal those of the float32 predictions. (This used to raise a dtype error.)
    outputs, targets = random_batch([2, 0, 3], [(20, 24), (20, 24), (24, 32)], seed=5)
    half = {k: v.to(dtype) for k, v in outputs.items()}
    full = {k: v.float() for k, v in half.items()}
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = matcher.compute_costs(half, targets)
    torch.manual_seed(0)
    expected = matcher.compute_costs(full, targets)
    for cost, exp in zip(ours, expected):
        assert cost.dtype == torch.float32 and torch.equal(cost, exp)


def random_batch(target_counts, target_sizes, seed=0):
    """Outputs [B, 6, 12, 16] over 4 classes and targets with the given counts and mask sizes."""
    gen = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(len(target_counts), 6, 5, generator=gen),
        "pred_masks": 3 * torch.randn(len(target_counts), 6, 12, 16, generator=gen),
    }
    targets = [
        {
            "labels": torch.randint(0, 4, (n,), generator=gen),
            "masks": torch.rand(n, *size, generator=gen) > 0.6,
        }
        for n, size in zip(target_counts, target_sizes)
    ]
    return outputs, targets


@pytest.mark.parametrize("num_points", [0, 50])
def test_batched_equals_per_image(num_points):
    outputs, targets = random_batch([3, 0, 4, 6], [(48, 64), (48, 64), (40, 60), (24, 32)])
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)
    torch.manual_seed(0)
    batched_costs = matcher.compute_costs(outputs, targets)
    torch.manual_seed(0)
    batched = matcher(outputs, targets)

    single_costs, single = [], []
    torch.manual_seed(0)
    for b, target in enumerate(targets):
        one = {k: v[b : b + 1] for k, v in outputs.items()}
        single_costs += matcher.compute_costs(one, [target])
    torch.manual_seed(0)
    for b, target in enumerate(targets):
        single += matcher({k: v[b : b + 1] for k, v in outputs.items()}, [target])

    assert [c.shape[1] for c in batched_costs] == [3, 0, 4, 6]
    assert [c.dtype for c in batched_costs] == [torch.float32] * 4
    assert all(torch.equal(b, s) for b, s in zip(batched_costs, single_costs))
    assert_indices_equal(batched, single)
    # Q = 6 queries: every target is matched when there are at most 6 of them.
    assert [len(src) for src, _ in batched] == [3, 0, 4, 6]


@pytest.mark.parametrize("num_points", [0, 50])
def test_all_targets_empty(num_points):
    outputs, targets = random_batch([0, 0], [(48, 64), (48, 64)])
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0, num_points=num_points)
    costs = matcher.compute_costs(outputs, targets)
    assert [tuple(c.shape) for c in costs] == [(6, 0), (6, 0)]
    for src, tgt in matcher(outputs, targets):
        assert src.dtype == tgt.dtype == torch.int64
        assert src.numel() == tgt.numel() == 0


def test_mask2former_draws_once_per_image_including_empty(monkeypatch):
    outputs, targets = random_batch([0, 2, 0], [(48, 64)] * 3)
    draws = []
    real_rand = torch.rand

    def logging_rand(*size, **kwargs):
        draws.append(list(size))
        return real_rand(*size, **kwargs)

    monkeypatch.setattr(torch, "rand", logging_rand)
    HungarianMatcher(num_points=7)(outputs, targets)
    assert draws == [[1, 7, 2]] * 3


@pytest.mark.parametrize("bad_label", [7, -1])
def test_bad_label_raises(bad_label):
    targets = [{"labels": torch.tensor([0, bad_label]), "masks": torch.zeros(2, 4, 4)}]
    with pytest.raises(ValueError, match=rf"{bad_label}.*num_classes=5"):
        check_target_labels(targets, num_classes=5)
    check_target_labels([{"labels": torch.tensor([0, 4])}], num_classes=5)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        HungarianMatcher(cost_class=0, cost_mask=0, cost_dice=0)
    with pytest.raises(ValueError):
        HungarianMatcher(num_points=-1)
    outputs, targets = random_batch([1, 1], [(8, 8), (8, 8)])
    with pytest.raises(ValueError, match="2 targets"):
        HungarianMatcher()({k: v[:1] for k, v in outputs.items()}, targets)
