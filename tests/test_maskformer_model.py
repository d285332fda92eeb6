"""The MaskFormer meta-architecture end to end: parity with the published model, training and
inference on CPU, bad input."""

import pytest
import torch
from conftest import load_golden, set_flat, tiny_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

from mask_former.modeling.meta_arch import mask_former_model as model_module

METADATA_NAME = "mask_former_test_tiny"
MetadataCatalog.get(METADATA_NAME).set(thing_dataset_id_to_contiguous_id={1: 1, 2: 2, 3: 3})


def golden_model(golden):
    from conftest import REPO
    from detectron2.config import get_cfg

    from mask_former import add_mask_former_config

    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / golden["published_config"].split("configs/")[1]))
    set_flat(cfg, golden["overrides"])
    meta = golden["metadata"]
    MetadataCatalog.get(meta["name"]).set(
        thing_dataset_id_to_contiguous_id=meta["thing_dataset_id_to_contiguous_id"]
    )
    model = build_model(cfg)
    assert list(model.state_dict().keys()) == list(golden["state_dict"].keys())
    model.load_state_dict(golden["state_dict"], strict=True)
    return model


def with_instances(inputs, gts):
    out = []
    for x, gt in zip(inputs, gts):
        x = dict(x)
        inst = Instances(tuple(x["image"].shape[-2:]))
        inst.gt_classes = gt["gt_classes"]
        inst.gt_masks = gt["gt_masks"]
        x["instances"] = inst
        out.append(x)
    return out


def test_tiny_model_inference_matches_published(one_thread):
    golden = load_golden("maskformer_tiny_model.pt")
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
        assert "instances" not in ours
    # the second image asks for 100x140, twice its own size
    assert outputs[1]["sem_seg"].shape == (5, 100, 140)


@pytest.mark.parametrize(
    "step", ["resize_to_output", "semantic_inference", "panoptic_inference", "instance_inference"]
)
def test_inference_steps_retry_after_cuda_out_of_memory(monkeypatch, step):
    # As published: a CUDA OOM in a step at the output size is retried (detectron2's
    # retry_if_cuda_oom: after emptying the cache, then on CPU copies); the results are the same.
    golden = load_golden("maskformer_tiny_model.pt")
    model = golden_model(golden).eval()
    model.instance_on = model.sem_seg_postprocess_before_inference = True
    inputs = [dict(x) for x in golden["inputs"]]
    with torch.no_grad():
        expected = model(inputs)
    real, failures = getattr(model_module, step), []

    def out_of_memory_once(*args, **kwargs):
        if not failures:
            failures.append(step)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, step, out_of_memory_once)
    with torch.no_grad():
        outputs = model(inputs)
    assert failures == [step]
    for ours, ref in zip(outputs, expected):
        assert torch.equal(ours["sem_seg"], ref["sem_seg"])
        assert torch.equal(ours["panoptic_seg"][0], ref["panoptic_seg"][0])
        assert ours["panoptic_seg"][1] == ref["panoptic_seg"][1]
        assert torch.equal(ours["instances"].pred_masks, ref["instances"].pred_masks)
        assert torch.equal(ours["instances"].scores, ref["instances"].scores)


def test_tiny_model_training_losses_match_published(one_thread):
    golden = load_golden("maskformer_tiny_model.pt")
    model = golden_model(golden).train()
    losses = model(with_instances(golden["inputs"], golden["train_gt"]))
    assert set(losses) == set(golden["losses"])
    for name, value in golden["losses"].items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name


def random_batch(sizes, num_classes=5, seed=0, empty=()):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i, (h, w) in enumerate(sizes):
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        n = 0 if i in empty else 3
        inst = Instances((h, w))
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        inst.gt_masks = BitMasks(torch.rand((n, h, w), generator=g) > 0.6)
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


def test_train_step_backward_and_loss_names():
    model = build_model(tiny_cfg()).train()
    losses = model(random_batch([(64, 80), (50, 70)]))
    expected = {f"loss_{t}{s}" for t in ("ce", "mask", "dice") for s in ("", "_0")}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.sem_seg_head.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_image_without_segments_trains():
    model = build_model(tiny_cfg()).train()
    losses = model(random_batch([(64, 64), (64, 64)], empty=(0, 1)))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    # nothing to match: every query is "no object", mask losses are zero
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    assert losses["loss_ce"].item() > 0


@pytest.mark.parametrize("task", ["semantic", "panoptic", "instance"])
def test_eval_odd_sizes_all_tasks(task):
    cfg = tiny_cfg(DATASETS__TRAIN=(METADATA_NAME,))
    set_flat(
        cfg,
        {
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
        assert r["sem_seg"].shape == (5, h, w)
        if task == "panoptic":
            seg, info = r["panoptic_seg"]
            assert seg.shape == (h, w)
            assert set(seg.unique().tolist()) <= {0} | {s["id"] for s in info}
        if task == "instance":
            inst = r["instances"]
            assert inst.image_size == (h, w)
            assert len(inst) == 6 and inst.pred_masks.shape == (6, h, w)
            assert inst.pred_boxes.tensor.shape == (6, 4)
            assert (inst.scores[:-1] >= inst.scores[1:]).all()


def test_batched_inference_equals_single_images_of_same_size():
    model = build_model(tiny_cfg()).eval()
    batch = random_batch([(64, 96), (64, 96)], seed=3)
    with torch.no_grad():
        together = model(batch)
        alone = [model([x])[0] for x in batch]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a["sem_seg"], b["sem_seg"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 32, 32), (4, 32, 32), (3, 0, 32), (32, 32)])
def test_bad_image_shape_is_rejected(shape):
    model = build_model(tiny_cfg()).eval()
    with pytest.raises(ValueError, match=r"shape \(" + ", ".join(map(str, shape))):
        model([{"image": torch.zeros(shape)}])


def test_label_out_of_range_is_rejected():
    model = build_model(tiny_cfg()).train()
    batch = random_batch([(64, 64)])
    batch[0]["instances"].gt_classes[0] = 7  # NUM_CLASSES is 5
    with pytest.raises(ValueError, match="7.*5|5.*7"):
        model(batch)


def test_training_without_instances_is_a_clear_error():
    model = build_model(tiny_cfg()).train()
    with pytest.raises(ValueError, match="instances"):
        model([{"image": torch.zeros(3, 64, 64)}])


def test_family_derivation_and_override():
    from mask_former.modeling import resolve_family

    cfg = tiny_cfg()
    assert resolve_family(cfg) == "MaskFormer"
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    assert resolve_family(cfg) == "Mask2Former"
    cfg.MODEL.MASK_FORMER.FAMILY = "MaskFormer"
    assert resolve_family(cfg) == "MaskFormer"
    cfg.MODEL.MASK_FORMER.FAMILY = "Mask3Former"
    with pytest.raises(ValueError, match="Mask3Former"):
        resolve_family(cfg)


MF_CONFIG = "configs/ade20k-150/maskformer_R50_bs16_160k.yaml"
M2F_CONFIG = "configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml"
M2F_INSTANCE_CONFIG = "configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml"
BAD_CONFIG_VALUES = [
    # (config, overrides, message); each value used to fail later, in torch, without naming its
    # key, or (TRAIN_NUM_POINTS 0) to train silently with MaskFormer's pixel-wise losses.
    (MF_CONFIG, {"MODEL.MASK_FORMER.DEC_LAYERS": 0}, r"DEC_LAYERS must be >= 1, got 0"),
    (MF_CONFIG, {"MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 0}, r"NUM_OBJECT_QUERIES must be >= 1"),
    (M2F_CONFIG, {"MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 0}, r"NUM_OBJECT_QUERIES must be >= 1"),
    (MF_CONFIG, {"MODEL.MASK_FORMER.NHEADS": 5}, r"HIDDEN_DIM \(32\) must be a multiple of .*"),
    (
        M2F_CONFIG,
        {"MODEL.MASK_FORMER.HIDDEN_DIM": 33, "MODEL.MASK_FORMER.NHEADS": 1},
        r"HIDDEN_DIM must be even",
    ),
    (
        M2F_CONFIG,
        {"MODEL.MASK_FORMER.HIDDEN_DIM": 40, "MODEL.MASK_FORMER.NHEADS": 5},
        r"CONVS_DIM \(32\) must be a multiple of MODEL.MASK_FORMER.NHEADS \(5\)",
    ),
    (M2F_CONFIG, {"MODEL.MASK_FORMER.TRAIN_NUM_POINTS": 0}, r"TRAIN_NUM_POINTS must be >= 1"),
    (M2F_CONFIG, {"MODEL.MASK_FORMER.OVERSAMPLE_RATIO": 0.5}, r"OVERSAMPLE_RATIO must be >= 1"),
    (M2F_CONFIG, {"MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO": 1.5}, r"must be in \[0, 1\]"),
    (
        M2F_CONFIG,
        {"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE": "res5"},
        r"TRANSFORMER_IN_FEATURE='res5' does not suit MultiScaleMaskedTransformerDecoder",
    ),
    (
        MF_CONFIG,
        {"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE": "multi_scale_pixel_decoder"},
        r"does not suit StandardTransformerDecoder .* reads one map",
    ),
    (M2F_INSTANCE_CONFIG, {"TEST.DETECTIONS_PER_IMAGE": -1}, r"DETECTIONS_PER_IMAGE must be >= 0"),
]


@pytest.mark.parametrize("config_file, overrides, message", BAD_CONFIG_VALUES)
def test_bad_config_values_are_rejected_when_building(config_file, overrides, message):
    cfg = tiny_cfg(config_file)
    set_flat(cfg, overrides)
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_a_subclassed_decoder_may_read_other_inputs_than_its_base():
    # The TRANSFORMER_IN_FEATURE check applies to the classes that declare what they read, not
    # to users' subclasses: this one reads the coarsest of the multi-scale levels.
    from mask_former.modeling.transformer_decoder import (
        TRANSFORMER_DECODER_REGISTRY,
        StandardTransformerDecoder,
    )

    name = "_TestCoarsestLevelDecoder"
    if name not in TRANSFORMER_DECODER_REGISTRY:

        class _TestCoarsestLevelDecoder(StandardTransformerDecoder):
            def forward(self, x, mask_features, mask=None):
                return super().forward(x[0], mask_features, mask)

        TRANSFORMER_DECODER_REGISTRY.register(_TestCoarsestLevelDecoder)
    cfg = tiny_cfg(M2F_CONFIG)
    set_flat(
        cfg,
        {
            "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME": name,
            "MODEL.MASK_FORMER.FAMILY": "MaskFormer",
        },
    )
    model = build_model(cfg).eval()
    with torch.no_grad():
        (result,) = model(random_batch([(64, 96)]))
    assert result["sem_seg"].shape == (5, 64, 96)


@pytest.mark.parametrize(
    "image_size, out", [((40, 60), (40, 60)), ((33, 50), (33, 50)), ((33, 50), (70, 20))]
)
def test_resize_to_output_equals_detectron2_postprocess(image_size, out):
    from detectron2.modeling.postprocessing import sem_seg_postprocess

    from mask_former.modeling.meta_arch.mask_former_model import resize_to_output

    maps = torch.randn(5, 40, 60)
    expected = sem_seg_postprocess(maps, image_size, *out)
    assert torch.equal(resize_to_output(maps, image_size, *out), expected)


def test_thing_ids_are_read_from_the_metadata_when_used(caplog):
    """As published, the thing classes come from the metadata at inference time: metadata
    completed after the model was built is used (a warning says it was missing at build time)."""
    import logging

    name = "mask_former_test_late_metadata"
    cfg = tiny_cfg(DATASETS__TRAIN=(name,), MODEL__MASK_FORMER__TEST__PANOPTIC_ON=True)
    with caplog.at_level(logging.WARNING):
        model = build_model(cfg)
    assert model.thing_ids == frozenset()
    assert "has no thing_dataset_id_to_contiguous_id" in caplog.text
    MetadataCatalog.get(name).set(thing_dataset_id_to_contiguous_id={5: 0, 7: 2})
    try:
        assert model.thing_ids == {0, 2}
    finally:
        MetadataCatalog.remove(name)


@pytest.mark.parametrize(
    "config",
    [
        "configs/ade20k-150/maskformer_R50_bs16_160k.yaml",
        "configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml",
    ],
)
def test_inference_skips_the_intermediate_predictions(config, one_thread, monkeypatch):
    """Called directly in eval mode, the head returns the intermediate predictions as published;
    the model's inference, which reads only the last one, has the decoder skip them, with the same
    results (bit for bit at one thread, as the goldens; at several threads the tiny shapes here
    may round the last prediction differently when computed alone)."""
    import contextlib

    torch.manual_seed(0)
    model = build_model(tiny_cfg(config)).eval()
    predictor = model.sem_seg_head.predictor
    seen = []
    predictor.register_forward_hook(lambda module, args, out: seen.append(set(out)))
    inputs = [{"image": torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)}]
    with torch.no_grad():
        lean = model(inputs)[0]["sem_seg"]
        assert seen == [{"pred_logits", "pred_masks"}]
        assert predictor.aux_outputs_in_eval  # restored after inference
        features = model.backbone(model.preprocess_image(inputs).tensor)
        assert "aux_outputs" in model.sem_seg_head(features)
        # inference with every intermediate prediction computed, as the published model does
        monkeypatch.setattr(
            model_module, "final_predictions_only", lambda head: contextlib.nullcontext()
        )
        full = model(inputs)[0]["sem_seg"]
    assert "aux_outputs" in seen[-1]
    assert torch.equal(lean, full)
