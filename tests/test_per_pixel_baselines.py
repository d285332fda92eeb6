"""The paper's per-pixel classification baselines (with detectron2's SemanticSegmentor): losses,
deep supervision, ignore label, inference output, bad config."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cfg
from detectron2.modeling import build_model

BASELINE = "configs/ade20k-150/per_pixel_baseline_R50_bs16_160k.yaml"
PLUS = "configs/ade20k-150/per_pixel_baseline_plus_R50_bs16_160k.yaml"
NUM_CLASSES = 5
IGNORE = 255

pytestmark = pytest.mark.usefixtures("one_thread")


def build(config, **overrides):
    torch.manual_seed(0)
    overrides.setdefault("MODEL__MASK_FORMER__NUM_OBJECT_QUERIES", NUM_CLASSES)
    return build_model(tiny_cfg(config, **overrides))


def batch(height=64, width=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(2):
        sem_seg = torch.randint(0, NUM_CLASSES, (height, width), generator=generator)
        sem_seg[:8] = IGNORE
        image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
        inputs.append({"image": image, "sem_seg": sem_seg, "height": height, "width": width})
    return inputs


def head_logits(model, inputs):
    """The head's per-pixel logits at 1/4 of the input and the targets, recomputed step by step."""
    images = torch.stack(
        [(x["image"].float() - model.pixel_mean) / model.pixel_std for x in inputs]
    )
    features = model.backbone(images)
    head = model.sem_seg_head
    mask_features, encoder_features, _ = head.pixel_decoder.forward_features(features)
    targets = torch.stack([x["sem_seg"] for x in inputs])
    return head, mask_features, encoder_features, features, targets


def expected_loss(logits, targets, weight):
    upsampled = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
    return F.cross_entropy(upsampled, targets, ignore_index=IGNORE) * weight


def test_baseline_loss_is_cross_entropy_of_the_upsampled_logits():
    model = build(BASELINE).train()
    inputs = batch()
    losses = model(inputs)
    assert set(losses) == {"loss_sem_seg"}
    head, mask_features, _, _, targets = head_logits(model, inputs)
    expected = expected_loss(head.predictor(mask_features), targets, head.loss_weight)
    torch.testing.assert_close(losses["loss_sem_seg"], expected)
    losses["loss_sem_seg"].backward()
    assert head.predictor.weight.grad.abs().sum() > 0


def test_plus_head_has_one_query_per_class_and_deep_supervision():
    model = build(PLUS, MODEL__MASK_FORMER__DEC_LAYERS=3).train()
    predictor = model.sem_seg_head.predictor
    assert not hasattr(predictor, "class_embed")
    assert predictor.query_embed.num_embeddings == NUM_CLASSES
    inputs = batch()
    losses = model(inputs)
    assert set(losses) == {"loss_sem_seg", "loss_sem_seg_0", "loss_sem_seg_1"}
    head, mask_features, _, features, targets = head_logits(model, inputs)
    out = predictor(features["res5"], mask_features)
    weight = head.loss_weight
    torch.testing.assert_close(
        losses["loss_sem_seg"], expected_loss(out["pred_masks"], targets, weight)
    )
    for i, aux in enumerate(out["aux_outputs"]):
        torch.testing.assert_close(
            losses[f"loss_sem_seg_{i}"], expected_loss(aux["pred_masks"], targets, weight)
        )
    without = build(PLUS, MODEL__MASK_FORMER__DEEP_SUPERVISION=False).train()
    assert set(without(batch())) == {"loss_sem_seg"}


@pytest.mark.parametrize("config", [BASELINE, PLUS])
def test_ignored_pixels_do_not_count(config):
    model = build(config).train()
    inputs = batch()
    kept = [dict(x, sem_seg=x["sem_seg"].clone()) for x in inputs]
    for x in kept:
        x["sem_seg"][8:] = IGNORE
        x["sem_seg"][30, 40] = 2  # one labelled pixel per image
    head, mask_features, _, features, targets = head_logits(model, kept)
    if config == BASELINE:
        logits = head.predictor(mask_features)
    else:
        logits = head.predictor(features["res5"], mask_features)["pred_masks"]
    upsampled = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
    expected = -F.log_softmax(upsampled[:, :, 30, 40], dim=1)[:, 2].mean() * head.loss_weight
    torch.testing.assert_close(model(kept)["loss_sem_seg"], expected)


@pytest.mark.parametrize("config", [BASELINE, PLUS])
def test_inference_gives_class_scores_at_the_requested_size(config):
    model = build(config).eval()
    inputs = [dict(x, height=50, width=75) for x in batch()]
    with torch.no_grad():
        outputs = model(inputs)
        head, mask_features, _, features, _ = head_logits(model, inputs)
        if config == BASELINE:
            logits = head.predictor(mask_features)
        else:
            logits = head.predictor(features["res5"], mask_features)["pred_masks"]
    assert [o["sem_seg"].shape for o in outputs] == [(NUM_CLASSES, 50, 75)] * 2
    upsampled = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
    expected = F.interpolate(upsampled[:1], size=(50, 75), mode="bilinear", align_corners=False)
    torch.testing.assert_close(outputs[0]["sem_seg"], expected[0])


def test_plus_head_needs_one_query_per_class():
    with pytest.raises(
        ValueError, match=r"NUM_OBJECT_QUERIES \(7\) must equal .*NUM_CLASSES \(5\)"
    ):
        build(PLUS, MODEL__MASK_FORMER__NUM_OBJECT_QUERIES=7)
