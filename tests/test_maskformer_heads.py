"""MaskFormer heads against the published implementation's outputs (../shared/golden)."""

import pytest
import torch
from conftest import load_golden, set_flat
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_sem_seg_head

from mask_former import add_mask_former_config
from mask_former.modeling.meta_arch.mask_former_model import final_predictions_only

ATOL = RTOL = 1e-5


def cfg_with(flat):
    """A config with the golden file's {dotted key: value} entries applied."""
    cfg = get_cfg()
    add_mask_former_config(cfg)
    return set_flat(cfg, flat)


def build_golden_head(golden):
    cfg = cfg_with(golden["cfg"])
    shapes = {
        k: ShapeSpec(channels=v["channels"], stride=v["stride"])
        for k, v in golden["input_shapes"].items()
    }
    head = build_sem_seg_head(cfg, shapes)
    state_dict = {k[len("sem_seg_head.") :]: v for k, v in golden["state_dict"].items()}
    assert list(head.state_dict().keys()) == list(state_dict.keys())
    head.load_state_dict(state_dict, strict=True)
    return head.eval()


@pytest.mark.parametrize(
    "name, decoder",
    [
        ("maskformer_head_fpn.pt", "BasePixelDecoder"),
        ("maskformer_head_transformer_encoder.pt", "TransformerEncoderPixelDecoder"),
    ],
)
def test_head_matches_golden(name, decoder):
    golden = load_golden(name)
    head = build_golden_head(golden)
    assert type(head.pixel_decoder).__name__ == decoder
    with torch.no_grad():
        # Eval mode returns the intermediate predictions, as the published decoder does ...
        out = head(golden["features"])
        # ... and skips them inside final_predictions_only (the meta-architecture's inference).
        with final_predictions_only(head):
            lean = head(golden["features"])
        assert head.predictor.aux_outputs_in_eval  # restored
        mask_features, encoder_features, multi_scale = head.pixel_decoder.forward_features(
            golden["features"]
        )
    assert "aux_outputs" not in lean
    torch.testing.assert_close(lean["pred_logits"], out["pred_logits"], atol=0, rtol=0)
    torch.testing.assert_close(lean["pred_masks"], out["pred_masks"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["pred_logits"], golden["pred_logits"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["pred_masks"], golden["pred_masks"], atol=ATOL, rtol=RTOL)
    assert len(out["aux_outputs"]) == len(golden["aux_outputs"]) == 1
    for ours, ref in zip(out["aux_outputs"], golden["aux_outputs"]):
        torch.testing.assert_close(ours["pred_logits"], ref["pred_logits"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(ours["pred_masks"], ref["pred_masks"], atol=ATOL, rtol=RTOL)

    inter = golden["intermediates"]
    torch.testing.assert_close(mask_features, inter["mask_features"], atol=ATOL, rtol=RTOL)
    assert [f.shape[-2:] for f in multi_scale] == [(2, 3), (4, 6), (8, 12)]
    for ours, ref in zip(multi_scale, inter["multi_scale_features"]):
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)
    if "transformer_encoder_features" in inter:
        torch.testing.assert_close(
            encoder_features, inter["transformer_encoder_features"], atol=ATOL, rtol=RTOL
        )
    else:
        assert encoder_features is None


def test_input_projection_only_when_needed():
    fpn = build_golden_head(load_golden("maskformer_head_fpn.pt"))
    enc = build_golden_head(load_golden("maskformer_head_transformer_encoder.pt"))
    # res5 has 40 channels != HIDDEN_DIM 32: projected; the encoder output has 32: identity.
    assert isinstance(fpn.predictor.input_proj, torch.nn.Conv2d)
    assert isinstance(enc.predictor.input_proj, torch.nn.Sequential)
    assert len(list(enc.predictor.input_proj.parameters())) == 0


def test_pre_norm_and_no_deep_supervision_build_and_run():
    golden = load_golden("maskformer_head_fpn.pt")
    flat = dict(golden["cfg"])
    flat.update(
        {
            "MODEL.MASK_FORMER.PRE_NORM": True,
            "MODEL.MASK_FORMER.DEEP_SUPERVISION": False,
            "MODEL.MASK_FORMER.ENC_LAYERS": 1,
        }
    )
    cfg = cfg_with(flat)
    shapes = {
        k: ShapeSpec(channels=v["channels"], stride=v["stride"])
        for k, v in golden["input_shapes"].items()
    }
    head = build_sem_seg_head(cfg, shapes).eval()
    keys = head.state_dict().keys()
    # pre-norm adds the encoder's final LayerNorm; the decoder norm exists in both variants
    assert "predictor.transformer.encoder.norm.weight" in keys
    assert "predictor.transformer.decoder.norm.weight" in keys
    with torch.no_grad():
        out = head(golden["features"])
    assert "aux_outputs" not in out
    assert out["pred_masks"].shape == (2, 7, 16, 24)
    assert torch.isfinite(out["pred_masks"]).all()


def test_unknown_transformer_in_feature_names_the_choices():
    golden = load_golden("maskformer_head_fpn.pt")
    flat = dict(golden["cfg"], **{"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE": "res9"})
    shapes = {
        k: ShapeSpec(channels=v["channels"], stride=v["stride"])
        for k, v in golden["input_shapes"].items()
    }
    with pytest.raises(ValueError, match="res9.*pixel_embedding"):
        build_sem_seg_head(cfg_with(flat), shapes)


def test_pixel_decoder_registered_the_published_way():
    """A pixel decoder written for the published code: registered in detectron2's
    SEM_SEG_HEADS_REGISTRY and returning (mask_features, transformer_encoder_features) only."""
    from conftest import tiny_cfg
    from detectron2.modeling import SEM_SEG_HEADS_REGISTRY, build_model

    from mask_former.modeling.pixel_decoder import BasePixelDecoder

    class PublishedStylePixelDecoder(BasePixelDecoder):
        def forward_features(self, features):
            mask_features, encoder_features, _ = super().forward_features(features)
            return mask_features, encoder_features

    name = PublishedStylePixelDecoder.__name__
    SEM_SEG_HEADS_REGISTRY.register(PublishedStylePixelDecoder)
    try:
        torch.manual_seed(0)
        model = build_model(tiny_cfg(MODEL__SEM_SEG_HEAD__PIXEL_DECODER_NAME=name)).eval()
        torch.manual_seed(0)
        reference = build_model(tiny_cfg()).eval()
    finally:
        SEM_SEG_HEADS_REGISTRY._obj_map.pop(name)
    assert type(model.sem_seg_head.pixel_decoder) is PublishedStylePixelDecoder
    inputs = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)}]
    with torch.no_grad():
        assert torch.equal(model(inputs)[0]["sem_seg"], reference(inputs)[0]["sem_seg"])


def test_pixel_decoder_outputs_are_checked():
    from mask_former.modeling.pixel_decoder import pixel_decoder_outputs

    class OneOutput(torch.nn.Module):
        def forward_features(self, features):
            return features["res2"]

    with pytest.raises(ValueError, match="OneOutput.forward_features must return"):
        pixel_decoder_outputs(OneOutput(), {"res2": torch.zeros(1)})
