"""The Mask2Former configuration of the meta-architecture end to end: parity with the published
model, .pkl loading, training and inference on CPU (the published state_dict layouts are checked
for every recorded file in test_checkpoint_compat.py)."""

import logging

import pytest
import torch
from conftest import load_golden, set_flat, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from test_checkpoint_compat import _old_layout, _pkl
from test_maskformer_model import METADATA_NAME, golden_model, random_batch

from mask_former.modeling import resolve_family

# One thread: the goldens were recorded with one, and the CPU is shared (faster too).
pytestmark = pytest.mark.usefixtures("one_thread")

M2F_CONFIG = "configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml"
DEC_LAYERS = 3  # 2 masked-attention layers + the initial prediction


def m2f_tiny_cfg(config_file=M2F_CONFIG, **overrides):
    """The M2F config at tiny width: 2 decoder layers, 1 encoder layer, few sampled points."""
    defaults = {
        "MODEL__MASK_FORMER__DEC_LAYERS": DEC_LAYERS,
        "MODEL__SEM_SEG_HEAD__TRANSFORMER_ENC_LAYERS": 1,
        "MODEL__MASK_FORMER__TRAIN_NUM_POINTS": 256,
    }
    return tiny_cfg(config_file, **{**defaults, **overrides})


def sorted_golden_instances(ref):
    """The reference's instances by score, descending (its own order is implementation-defined);
    the scores have no ties, so this is also the order of ties broken by flat index."""
    scores = ref["scores"]
    assert len(set(scores.tolist())) == len(scores)
    order = torch.sort(scores, descending=True, stable=True).indices
    return {k: v[order] for k, v in ref.items()}


def test_tiny_model_inference_matches_published(one_thread):
    golden = load_golden("mask2former_tiny_model.pt")
    model = golden_model(golden).eval()
    with torch.no_grad():
        outputs = model([dict(x) for x in golden["inputs"]])
    assert len(outputs) == 2
    for ours, ref in zip(outputs, golden["outputs"]):
        torch.testing.assert_close(ours["sem_seg"], ref["sem_seg"], atol=1e-4, rtol=0)
        seg, info = ours["panoptic_seg"]
        assert seg.dtype == torch.int32
        assert torch.equal(seg, ref["panoptic_seg"])
        assert info == ref["segments_info"]
        inst, expected = ours["instances"], sorted_golden_instances(ref["instances"])
        assert len(inst) == len(expected["scores"]) == 5
        assert torch.equal(inst.pred_masks, expected["pred_masks"])
        torch.testing.assert_close(inst.scores, expected["scores"], atol=1e-5, rtol=0)
        assert torch.equal(inst.pred_classes, expected["pred_classes"])
    assert outputs[1]["sem_seg"].shape == (5, 100, 140)


def test_family_is_mask2former():
    cfg = m2f_tiny_cfg()
    assert resolve_family(cfg) == "Mask2Former"
    model = build_model(cfg)
    assert model.criterion.num_points == 256  # point-sampled mask losses
    assert model.panoptic_mask_threshold_pixels
    assert model.sem_seg_head.predictor.num_layers == DEC_LAYERS - 1


@pytest.mark.parametrize("layout", ["pixel_decoder", "old"])
def test_pkl_checkpoint_loads_in_both_layouts(tmp_path, caplog, layout):
    torch.manual_seed(1)
    source = build_model(m2f_tiny_cfg())
    state_dict = source.state_dict()
    if layout == "old":
        state_dict = _old_layout(state_dict)
        assert "sem_seg_head.transformer.level_embed" in state_dict
    path = _pkl(tmp_path, f"{layout}.pkl", state_dict)

    torch.manual_seed(2)
    target = build_model(m2f_tiny_cfg())
    with caplog.at_level(logging.INFO):
        DetectionCheckpointer(target).load(path)
    text = caplog.text
    assert "not found" not in text and "not used" not in text, text
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k


def _deformable_attention_grads(model):
    attn = model.sem_seg_head.pixel_decoder.transformer.encoder.layers[0].self_attn
    return {name: p.grad for name, p in attn.named_parameters()}


def test_train_step_loss_names_and_backward():
    model = build_model(m2f_tiny_cfg()).train()
    losses = model(random_batch([(64, 80), (50, 70)]))
    suffixes = [""] + [f"_{i}" for i in range(DEC_LAYERS - 1)]
    assert set(losses) == {f"loss_{t}{s}" for t in ("ce", "mask", "dice") for s in suffixes}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = _deformable_attention_grads(model)
    assert set(grads) == {
        f"{m}.{p}"
        for m in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
        for p in ("weight", "bias")
    }
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_train_step_under_autocast():
    # The published M2F configs train with AMP (CUDA); CPU bfloat16 autocast stands in for it:
    # the pixel decoder stays float32, the matcher and losses take half-precision predictions.
    model = build_model(m2f_tiny_cfg()).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(random_batch([(64, 80), (50, 70)]))
    assert model.sem_seg_head.predictor.training
    total = sum(losses.values())
    assert torch.isfinite(total) and all(v.dtype == torch.float32 for v in losses.values())
    total.backward()
    for name, grad in _deformable_attention_grads(model).items():
        assert grad is not None and torch.isfinite(grad).all(), name


def test_image_without_segments_trains():
    model = build_model(m2f_tiny_cfg()).train()
    losses = model(random_batch([(64, 64), (64, 64)], empty=(0, 1)))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    assert losses["loss_ce"].item() > 0


def test_empty_previous_masks_train_without_nan():
    model = build_model(m2f_tiny_cfg()).train()
    last = model.sem_seg_head.predictor.mask_embed.layers[-1]
    pixel_embedding = model.sem_seg_head.pixel_decoder.mask_features
    with torch.no_grad():
        # mask logits = (-1, ..., -1) . (1, ..., 1) < 0: every mask is empty, so every query
        # must attend everywhere
        last.weight.zero_()
        last.bias.fill_(-1.0)
        pixel_embedding.weight.zero_()
        pixel_embedding.bias.fill_(1.0)
    with model.sem_seg_head.predictor.record_attention_masks() as attn_masks:
        losses = model(random_batch([(64, 64), (48, 80)]))
    assert len(attn_masks) == DEC_LAYERS and all(m.all() for m in attn_masks)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for name, p in model.sem_seg_head.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("size", [(64, 64), (96, 128), (37, 53)])
def test_dec_layers_1_predicts_from_the_initial_queries(size):
    # DEC_LAYERS 1 builds no masked-attention layer: as published, the prediction from the
    # initial queries is the output. (Inference crashed where the decoder skips intermediate
    # predictions: it took that prediction for an intermediate one.)
    model = build_model(m2f_tiny_cfg(MODEL__MASK_FORMER__DEC_LAYERS=1))
    assert model.sem_seg_head.predictor.num_layers == 0
    losses = model.train()(random_batch([(64, 64), (48, 80)]))
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    model.eval()
    with torch.no_grad():
        (result,) = model(random_batch([size]))
    assert result["sem_seg"].shape == (5, *size)
    assert torch.isfinite(result["sem_seg"]).all()


@pytest.mark.parametrize("task", ["semantic", "panoptic", "instance"])
def test_eval_odd_sizes_all_tasks(task):
    cfg = m2f_tiny_cfg(DATASETS__TRAIN=(METADATA_NAME,))
    set_flat(
        cfg,
        {
            "MODEL.MASK_FORMER.TEST.SEMANTIC_ON": task == "semantic",
            "MODEL.MASK_FORMER.TEST.PANOPTIC_ON": task == "panoptic",
            "MODEL.MASK_FORMER.TEST.INSTANCE_ON": task == "instance",
            "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD": 0.0,
            "TEST.DETECTIONS_PER_IMAGE": 6,
        },
    )
    model = build_model(cfg).eval()
    batch = random_batch([(37, 53), (61, 29)])
    batch[1]["height"], batch[1]["width"] = 90, 45  # ask for a different output size
    with torch.no_grad():
        results = model(batch)
    for r, (h, w) in zip(results, [(37, 53), (90, 45)]):
        # Mask2Former returns sem_seg only when SEMANTIC_ON
        assert set(r) == {
            {"semantic": "sem_seg", "panoptic": "panoptic_seg"}.get(task, "instances")
        }
        if task == "semantic":
            assert r["sem_seg"].shape == (5, h, w)
            assert torch.isfinite(r["sem_seg"]).all()
        if task == "panoptic":
            seg, info = r["panoptic_seg"]
            assert seg.shape == (h, w)
            assert set(seg.unique().tolist()) <= {0} | {s["id"] for s in info}
        if task == "instance":
            inst = r["instances"]
            assert inst.image_size == (h, w)
            assert len(inst) == 6 and inst.pred_masks.shape == (6, h, w)
            assert (inst.scores[:-1] >= inst.scores[1:]).all()
