"""Mask2Former's pixel decoder and masked-attention decoder against the published implementation's
outputs (../shared/golden/mask2former_head.pt), and their documented behaviour."""

import logging

import pytest
import torch
from conftest import load_golden
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_sem_seg_head
from test_maskformer_heads import build_golden_head, cfg_with

from mask_former.modeling.pixel_decoder.msdeformattn import (
    ENCODER_FEEDFORWARD_DIM,
    ENCODER_NUM_POINTS,
    MSDeformAttnPixelDecoder,
    _upsample_bilinear,
    encoder_reference_points,
)
from mask_former.modeling.transformer_decoder import PositionEmbeddingSine, mask2former_decoder
from mask_former.modeling.transformer_decoder.mask2former_decoder import (
    CachedPositionEmbeddingSine,
    attention_bias,
)

# One thread: the goldens were recorded with one, and the CPU is shared (faster too).
pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = "mask2former_head.pt"
ATOL = RTOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    return load_golden(GOLDEN)


def golden_shapes(golden):
    return {
        k: ShapeSpec(channels=v["channels"], stride=v["stride"])
        for k, v in golden["input_shapes"].items()
    }


def build_head(golden, **overrides):
    """A randomly initialised head of the golden file's config with ``overrides`` applied."""
    return build_sem_seg_head(cfg_with({**golden["cfg"], **overrides}), golden_shapes(golden))


def run_head(head, features, aux=True):
    """The head's steps one by one, recording the decoder's attention masks; with ``aux`` the
    decoder also returns its intermediate predictions in eval mode, as the published one does."""
    head.predictor.aux_outputs_in_eval = aux
    with torch.no_grad():
        mask_features, encoder_features, multi_scale = head.pixel_decoder.forward_features(features)
        with head.predictor.record_attention_masks() as attn_masks:
            out = head.predictor(multi_scale, mask_features)
    return out, (mask_features, encoder_features, multi_scale), attn_masks


def assert_close(ours, ref):
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def test_head_matches_golden(golden, one_thread):
    head = build_golden_head(golden)  # also checks the state_dict keys and their order
    out, (mask_features, encoder_features, multi_scale), attn_masks = run_head(
        head, golden["features"]
    )
    assert_close(out["pred_logits"], golden["pred_logits"])
    assert_close(out["pred_masks"], golden["pred_masks"])
    assert len(out["aux_outputs"]) == len(golden["aux_outputs"]) == 3
    for ours, ref in zip(out["aux_outputs"], golden["aux_outputs"]):
        assert_close(ours["pred_logits"], ref["pred_logits"])
        assert_close(ours["pred_masks"], ref["pred_masks"])

    inter = golden["intermediates"]
    assert_close(mask_features, inter["mask_features"])
    assert_close(encoder_features, inter["transformer_encoder_features"])
    assert [f.shape[-2:] for f in multi_scale] == [(2, 3), (4, 6), (8, 12)]
    for ours, ref in zip(multi_scale, inter["multi_scale_features"]):
        assert_close(ours, ref)
    assert len(attn_masks) == len(inter["attn_masks_pre_fix"]) == 4
    for ours, ref in zip(attn_masks, inter["attn_masks_pre_fix"]):
        assert ours.dtype == torch.bool and torch.equal(ours, ref)


def test_head_is_bit_exact_by_default(golden, one_thread):
    """The default deformable-attention core keeps the published arithmetic: the golden outputs
    and attention masks exactly (test_head_matches_golden allows the golden tolerance); the
    opt-in gather core stays within that tolerance."""
    from mask_former.layers import MSDeformAttn

    head = build_golden_head(golden)
    out, _, attn_masks = run_head(head, golden["features"])
    assert torch.equal(out["pred_logits"], golden["pred_logits"])
    assert torch.equal(out["pred_masks"], golden["pred_masks"])
    for ours, ref in zip(out["aux_outputs"], golden["aux_outputs"]):
        assert torch.equal(ours["pred_masks"], ref["pred_masks"])
    for ours, ref in zip(attn_masks, golden["intermediates"]["attn_masks_pre_fix"]):
        assert torch.equal(ours, ref)
    # Without the intermediate predictions, eval mode computes the attention masks of the 1/32
    # and 1/16 levels from the few mask logits their resize reads: still exact.
    lean, _, lean_attn_masks = run_head(head, golden["features"], aux=False)
    assert "aux_outputs" not in lean
    assert torch.equal(lean["pred_logits"], golden["pred_logits"])
    assert torch.equal(lean["pred_masks"], golden["pred_masks"])
    assert len(lean_attn_masks) == len(golden["intermediates"]["attn_masks_pre_fix"])
    for ours, ref in zip(lean_attn_masks, golden["intermediates"]["attn_masks_pre_fix"]):
        assert torch.equal(ours, ref)
    for module in head.modules():
        if isinstance(module, MSDeformAttn):
            module.impl = "gather"
    gathered, _, _ = run_head(head, golden["features"])
    assert_close(gathered["pred_masks"], golden["pred_masks"])
    assert_close(gathered["pred_logits"], golden["pred_logits"])
    assert not torch.equal(gathered["pred_masks"], golden["pred_masks"])


def test_head_forward_equals_step_by_step(golden):
    head = build_golden_head(golden)
    out, _, _ = run_head(head, golden["features"])
    with torch.no_grad():
        direct = head(golden["features"])
    assert torch.equal(direct["pred_masks"], out["pred_masks"])
    assert torch.equal(direct["pred_logits"], out["pred_logits"])
    # nothing is recorded outside record_attention_masks()
    assert head.predictor._attn_mask_log is None


def test_initialisation_matches_published(golden):
    """The golden weights are the published initialisation (torch.manual_seed(0)) plus seeded
    N(0, 0.05^2) noise in state_dict order: removing the noise gives our initialisation."""
    torch.manual_seed(0)
    head = build_head(golden)
    noise = torch.Generator().manual_seed(golden["seeds"]["perturb_seed"])
    std = golden["seeds"]["perturb_std"]
    for key, value in head.state_dict().items():
        ref = golden["state_dict"]["sem_seg_head." + key]
        initial = ref - torch.randn(ref.shape, generator=noise) * std
        torch.testing.assert_close(value, initial, atol=1e-6, rtol=0, msg=key)


def test_decoder_has_no_dropout_whatever_the_config_says(golden, monkeypatch):
    # Published: MASK_FORMER.DROPOUT reaches the deformable pixel decoder only.
    logged = []
    monkeypatch.setattr(
        mask2former_decoder, "log_first_n", lambda level, msg, **kw: logged.append((level, msg))
    )
    head = build_head(golden, **{"MODEL.MASK_FORMER.DROPOUT": 0.3})
    decoder_p = {m.p for m in head.predictor.modules() if isinstance(m, torch.nn.Dropout)}
    encoder_p = {m.p for m in head.pixel_decoder.modules() if isinstance(m, torch.nn.Dropout)}
    assert decoder_p == {0.0} and encoder_p == {0.3}
    assert [level for level, _ in logged] == [logging.WARNING]
    assert "MODEL.MASK_FORMER.DROPOUT=0.3 is not read" in logged[0][1]


@pytest.mark.parametrize("dec_layers", [1, 2, 4, 8])
def test_layer_count_and_level_cycle_follow_dec_layers(golden, dec_layers):
    head = build_head(golden, **{"MODEL.MASK_FORMER.DEC_LAYERS": dec_layers}).eval()
    predictor = head.predictor
    assert predictor.num_layers == dec_layers - 1
    assert len(predictor.transformer_cross_attention_layers) == dec_layers - 1
    out, (_, _, multi_scale), attn_masks = run_head(head, golden["features"])
    assert len(out["aux_outputs"]) == dec_layers - 1
    # prediction i makes the mask of layer i, which reads level i % 3 (coarsest first)
    sizes = [f.shape[-2] * f.shape[-1] for f in multi_scale]
    assert [m.shape[-1] for m in attn_masks] == [sizes[i % 3] for i in range(dec_layers)]


def test_dec_layers_zero_is_rejected(golden):
    with pytest.raises(ValueError, match="DEC_LAYERS"):
        build_head(golden, **{"MODEL.MASK_FORMER.DEC_LAYERS": 0})


def test_fully_masked_query_attends_everywhere(golden):
    """With every mask logit negative, every query's previous mask is empty: the rows are reset
    to "attend everywhere", exactly as if there were no attention mask, and nothing is NaN."""
    head = build_golden_head(golden)
    with torch.no_grad():
        last = head.predictor.mask_embed.layers[-1]
        last.weight.zero_()
        last.bias.fill_(-1.0)
        mask_features = torch.ones(2, 32, 16, 24)
        _, _, multi_scale = head.pixel_decoder.forward_features(golden["features"])
        with head.predictor.record_attention_masks() as attn_masks:
            masked = head.predictor(multi_scale, mask_features)
        assert all(m.all() for m in attn_masks)
        head.predictor._attention_mask = lambda logits, size: torch.zeros(
            logits.shape[:2] + (size[0] * size[1],), dtype=torch.bool
        )
        unmasked = head.predictor(multi_scale, mask_features)
    assert (
        torch.isfinite(masked["pred_logits"]).all() and torch.isfinite(masked["pred_masks"]).all()
    )
    assert torch.equal(masked["pred_logits"], unmasked["pred_logits"])
    assert torch.equal(masked["pred_masks"], unmasked["pred_masks"])


def test_attention_mask_threshold_and_empty_rows(golden):
    predictor = build_golden_head(golden).predictor
    logits = torch.full((1, 3, 4, 4), -2.0)
    logits[0, 1, :2] = 3.0  # top half of query 1 is inside its mask
    logits[0, 2] = 1.0  # query 2 covers everything
    with predictor.record_attention_masks() as recorded:
        mask = predictor._attention_mask(logits, (2, 2))
    assert recorded[0][0, 0].all()  # query 0's mask is empty before the reset ...
    assert not mask[0, 0].any()  # ... and attends everywhere after it
    assert mask[0, 1].tolist() == [False, False, True, True]
    assert not mask[0, 2].any()


@pytest.mark.parametrize("batch", [1, 2])
def test_attention_bias_equals_multihead_attention_bool_mask(batch):
    attn = torch.nn.MultiheadAttention(16, 4).eval()
    query, key = torch.randn(5, batch, 16), torch.randn(7, batch, 16)
    mask = torch.rand(batch, 5, 7) > 0.5
    mask[..., 0] = False
    with torch.no_grad():
        expected = attn(query, key, key, attn_mask=mask.repeat_interleave(4, dim=0))[0]
        ours = attn(query, key, key, attn_mask=attention_bias(mask, 4, query.dtype))[0]
    assert torch.equal(ours, expected)


def test_deformable_encoder_ignores_n_points_and_n_heads_keys(golden):
    """Published quirk: the encoder uses MASK_FORMER.NHEADS heads, 4 points and a 1024-wide FFN;
    SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS / _N_HEADS are not read."""
    reference = build_head(golden)
    ignored = build_head(
        golden,
        **{
            "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS": 2,
            "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS": 2,
        },
    )
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in ignored.state_dict().items()} == shapes
    attn = ignored.pixel_decoder.transformer.encoder.layers[0].self_attn
    assert (attn.n_heads, attn.n_points, attn.n_levels) == (4, ENCODER_NUM_POINTS, 3)
    layer = ignored.pixel_decoder.transformer.encoder.layers[0]
    assert layer.linear1.out_features == ENCODER_FEEDFORWARD_DIM == 1024


def test_pixel_decoder_levels_coarsest_first(golden):
    decoder = build_head(golden).pixel_decoder
    # input_proj.0 reads res5 (40 channels), input_proj.2 reads res3 (24 channels)
    assert [p[0].in_channels for p in decoder.input_proj] == [40, 32, 24]
    assert decoder.transformer_in_features == ["res3", "res4", "res5"]
    assert decoder.num_fpn_levels == 1 and hasattr(decoder, "adapter_1")


@pytest.mark.parametrize("batch", [1, 2])
def test_pixel_decoder_inference_equals_autograd_path(golden, batch):
    """Without autograd the FPN step resizes the channels-last encoder map into a channels-last
    tensor (batch 1); the values are those of the autograd path, bit for bit."""
    decoder = build_head(golden).pixel_decoder.eval()
    features = {k: v[:batch].clone() for k, v in golden["features"].items()}
    with torch.no_grad():
        plain = decoder.forward_features(features)
    tracked = decoder.forward_features({k: v.requires_grad_() for k, v in features.items()})
    assert torch.equal(plain[0], tracked[0].detach())  # mask features
    for a, b in zip(plain[2], tracked[2]):
        assert torch.equal(a, b.detach())


def test_pixel_decoder_runs_in_float32_under_autocast(golden):
    """Published M2F configs train with AMP; the published pixel decoder turns autocast off, so
    its outputs are float32 and equal the float32 computation (CPU bfloat16 autocast stands in
    for CUDA's here)."""
    decoder = build_head(golden).pixel_decoder.eval()
    with torch.no_grad():
        plain = decoder.forward_features(golden["features"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = decoder.forward_features(golden["features"])
    for ours, ref in zip([autocast[0], autocast[1], *autocast[2]], [plain[0], plain[1], *plain[2]]):
        assert ours.dtype == torch.float32
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("batch", [1, 3])
def test_upsample_bilinear_equals_interpolate(batch):
    # [B, H*W, C] -> [B, C, H, W], as the encoder's maps are laid out
    x = torch.randn(batch, 6 * 5, 7).transpose(1, 2).view(batch, 7, 6, 5)
    expected = torch.nn.functional.interpolate(
        x, size=(12, 10), mode="bilinear", align_corners=False
    )
    with torch.no_grad():
        out = _upsample_bilinear(x, (12, 10))
        contiguous = _upsample_bilinear(x.contiguous(), (12, 10))
    assert torch.equal(out, expected)
    torch.testing.assert_close(contiguous, expected)


def test_common_stride_decides_fpn_levels(golden):
    decoder = build_head(golden, **{"MODEL.SEM_SEG_HEAD.COMMON_STRIDE": 8}).pixel_decoder.eval()
    assert decoder.num_fpn_levels == 0
    assert not any(k.startswith(("adapter_", "layer_")) for k in decoder.state_dict())
    with torch.no_grad():
        mask_features, _, multi_scale = decoder.forward_features(golden["features"])
    assert mask_features.shape == (2, 32, 8, 12)  # stride 8: the res3 encoder level
    assert len(multi_scale) == 3


def test_common_stride_coarser_than_encoder_is_rejected(golden):
    with pytest.raises(ValueError, match="COMMON_STRIDE"):
        build_head(golden, **{"MODEL.SEM_SEG_HEAD.COMMON_STRIDE": 16})


def test_encoder_features_outside_in_features_are_rejected(golden):
    flat = {"MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": ["res3", "res6"]}
    with pytest.raises(ValueError, match="res6"):
        build_head(golden, **flat)


def test_encoder_reference_points_are_normalised_pixel_centres():
    points = encoder_reference_points([(2, 3), (1, 2)], batch=2, device=torch.device("cpu"))
    assert points.shape == (2, 8, 2, 2)
    xs = [0.5 / 3, 1.5 / 3, 2.5 / 3] * 2 + [0.25, 0.75]
    ys = [0.25] * 3 + [0.75] * 3 + [0.5, 0.5]
    expected = torch.tensor([xs, ys]).T
    for b in range(2):
        for level in range(2):
            assert torch.equal(points[b, :, level], expected)


def test_deformable_attention_implementation_is_selectable(golden):
    from mask_former.modeling.pixel_decoder import MSDeformAttnPixelDecoder

    shapes = {k: v for k, v in golden_shapes(golden).items()}
    cfg = cfg_with(golden["cfg"])
    decoders = {}
    for impl in ("auto", "gather", "pytorch"):
        torch.manual_seed(0)
        decoders[impl] = MSDeformAttnPixelDecoder(cfg, shapes, deform_attn_impl=impl).eval()
        assert {layer.self_attn.impl for layer in decoders[impl].transformer.encoder.layers} == {
            impl
        }
    with torch.no_grad():
        out = {k: d.forward_features(golden["features"])[0] for k, d in decoders.items()}
    assert torch.equal(out["auto"], out["pytorch"])  # on CPU "auto" is the grid_sample core
    # the gather core sums in another order: equal up to float rounding, not bit for bit
    torch.testing.assert_close(out["gather"], out["pytorch"], rtol=1e-5, atol=1e-5)
    assert not torch.equal(out["gather"], out["pytorch"])


def test_deformable_attention_implementation_from_config(golden):
    shapes = golden_shapes(golden)
    cfg = cfg_with(golden["cfg"])
    assert cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL == "auto"
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL = "gather"
    decoder = MSDeformAttnPixelDecoder(cfg, shapes)
    assert {layer.self_attn.impl for layer in decoder.transformer.encoder.layers} == {"gather"}
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL = "cuda"
    with pytest.raises(ValueError, match="DEFORMABLE_ATTENTION_IMPL must be one of"):
        MSDeformAttnPixelDecoder(cfg, shapes)


@pytest.mark.parametrize(
    "overrides",
    [
        {"MODEL.MASK_FORMER.PRE_NORM": True},
        {"MODEL.MASK_FORMER.DEEP_SUPERVISION": False},
        {"MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ": True},
        {"MODEL.SEM_SEG_HEAD.NORM": ""},
    ],
)
def test_variants_build_and_run(golden, overrides):
    head = build_head(golden, **overrides).eval()
    with torch.no_grad():
        out = head(golden["features"])
    assert out["pred_masks"].shape == (2, 7, 16, 24)
    assert out["pred_logits"].shape == (2, 7, 6)
    assert torch.isfinite(out["pred_masks"]).all() and torch.isfinite(out["pred_logits"]).all()
    # eval mode returns the intermediate predictions too, as published (with deep supervision)
    assert ("aux_outputs" in out) == overrides.get("MODEL.MASK_FORMER.DEEP_SUPERVISION", True)
    head.predictor.aux_outputs_in_eval = False
    with torch.no_grad():
        lean = head(golden["features"])
    assert "aux_outputs" not in lean and torch.equal(lean["pred_masks"], out["pred_masks"])
    if overrides.get("MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ"):
        assert all(isinstance(p, torch.nn.Conv2d) for p in head.predictor.input_proj)


def test_without_mask_classification_only_masks(golden):
    from mask_former.modeling.transformer_decoder import build_transformer_decoder

    torch.manual_seed(0)
    predictor = build_transformer_decoder(cfg_with(golden["cfg"]), 32, mask_classification=False)
    assert not hasattr(predictor, "class_embed")
    multi_scale = [torch.randn(2, 32, h, w) for h, w in [(2, 3), (4, 6), (8, 12)]]
    with torch.no_grad():
        out = predictor.eval()(multi_scale, torch.randn(2, 32, 16, 24))
    assert set(out) == {"pred_masks", "aux_outputs"}
    assert all(set(aux) == {"pred_masks"} for aux in out["aux_outputs"])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "mask_size, level_sizes",
    [
        # 1/4 mask features of a 512x640 image and its 1/32, 1/16, 1/8 levels (factors 8, 4, 2)
        ((128, 160), [(16, 20), (32, 40), (64, 80)]),
        # factor 8 in one direction, 4 in the other; factor 6; and sizes that are no multiple
        ((64, 48), [(8, 12), (16, 8), (32, 24)]),
        ((33, 50), [(5, 7), (9, 13), (17, 25)]),
    ],
)
def test_eval_attention_masks_from_sampled_logits_are_exact(
    golden, mask_size, level_sizes, channels_last
):
    """Eval mode without the intermediate predictions makes the same attention masks, final
    logits and masks bit for bit as the full computation of every prediction (and as training
    mode, which always makes every prediction)."""
    torch.manual_seed(0)
    predictor = build_golden_head(golden).predictor.eval()
    multi_scale = [torch.randn(2, 32, h, w) for h, w in level_sizes]
    # Mask logits near zero everywhere, so rounding differences would flip attention-mask pixels.
    mask_features = torch.randn(2, 32, *mask_size) * 1e-3
    if channels_last:
        mask_features = mask_features.contiguous(memory_format=torch.channels_last)
    results = {}
    for aux in (True, False):
        predictor.aux_outputs_in_eval = aux
        with torch.no_grad(), predictor.record_attention_masks() as attn_masks:
            out = predictor(multi_scale, mask_features)
        results[aux] = (out, attn_masks)
    (full, full_masks), (lean, lean_masks) = results[True], results[False]
    assert "aux_outputs" in full and "aux_outputs" not in lean
    assert torch.equal(full["pred_masks"], lean["pred_masks"])
    assert torch.equal(full["pred_logits"], lean["pred_logits"])
    assert len(full_masks) == len(lean_masks) == 4
    for ours, ref in zip(lean_masks, full_masks):
        assert torch.equal(ours, ref)
    # both attention-mask values occur, so the comparison is not trivial
    assert all(0 < m.float().mean() < 1 for m in full_masks)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "full, size, expected",
    [
        ((128, 160), (16, 20), ([3, 4, 11, 12], [3, 4, 11, 12])),  # factor 8: the first taps
        ((128, 160), (32, 40), ([1, 2, 5, 6], [1, 2, 5, 6])),  # factor 4
        ((64, 48), (16, 8), ([1, 2, 5, 6], [2, 3, 8, 9])),  # factors 4 and 6
        ((128, 160), (64, 80), None),  # factor 2: every pixel is read
        ((48, 48), (16, 16), None),  # factor 3
        ((64, 48), (8, 16), None),  # factors 8 and 3
        ((33, 50), (5, 7), None),  # not a multiple
        ((16, 16), (16, 16), None),  # identity
    ],
)
def test_pixels_read_by_downsample(full, size, expected, channels_last):
    features = torch.randn(2, 3, *full)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    sampled = mask2former_decoder.pixels_read_by_downsample(features, size)
    if expected is None:
        assert sampled is None
        return
    rows, cols = (torch.arange(n).mul(f).add(f // 2 - 1) for n, f in zip(size, factors(full, size)))
    rows = torch.stack([rows, rows + 1], 1).flatten()
    cols = torch.stack([cols, cols + 1], 1).flatten()
    assert (rows[:4].tolist(), cols[:4].tolist()) == expected
    assert torch.equal(sampled, features[:, :, rows][:, :, :, cols])
    assert sampled.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    resized = torch.nn.functional.interpolate(features, size, mode="bilinear", align_corners=False)
    from_sampled = torch.nn.functional.interpolate(
        sampled, size, mode="bilinear", align_corners=False
    )
    assert torch.equal(from_sampled, resized)


def factors(full, size):
    return [f // s for f, s in zip(full, size)]


def test_decoder_needs_three_levels(golden):
    predictor = build_golden_head(golden).predictor
    with pytest.raises(ValueError, match="3 feature levels"):
        predictor([torch.randn(2, 32, 2, 3)] * 2, torch.randn(2, 32, 16, 24))


def test_cached_position_encoding_equals_uncached():
    cached = CachedPositionEmbeddingSine(8, normalize=True)
    plain = PositionEmbeddingSine(8, normalize=True)
    for shape in [(2, 16, 5, 7), (1, 16, 5, 7), (3, 16, 4, 4), (2, 16, 5, 7)]:
        x = torch.randn(shape)
        assert torch.equal(cached(x), plain(x))
    assert len(cached._cache) == 2  # one entry per (H, W), shared by all batch sizes
    for size in range(1, 20):
        cached(torch.zeros(1, 1, size, 3))
    assert len(cached._cache) == cached.max_entries
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[:, :, 5:] = True  # padded maps are encoded afresh
    x = torch.randn(2, 16, 5, 7)
    assert torch.equal(cached(x, mask), plain(x, mask))
