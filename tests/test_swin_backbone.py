"""The Swin Transformer backbone: output names, shapes, strides and channels for any input size,
the published Tiny/Small/Base/Large settings, gradients, gradient checkpointing, and the forward
pass against a reference computed densely (one masked attention over the whole feature map
instead of shifted, padded windows)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, tiny_cfg
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from test_maskformer_model import random_batch

from mask_former import add_mask_former_config
from mask_former.modeling.backbone.swin import (
    MASKED_ATTENTION_LOGIT,
    D2SwinTransformer,
    PatchMerging,
    SwinBlock,
    WindowAttention,
    shifted_window_mask,
)

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = ["res2", "res3", "res4", "res5"]
# A small Swin: window 3 (shift 1), so that odd feature maps need window padding and the
# last stage (2x2 for the inputs below) is smaller than a window.
TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=3)


def tiny_swin(**overrides):
    return D2SwinTransformer(**{**TINY, "drop_path_rate": 0.0, **overrides})


# ------------------------------------------------------------------------- dense reference


def offset_grid_allowed(size, window_size, shift):
    """[size, size] bool: whether two rows (or columns) share a window of a grid offset by
    ``shift`` and clipped at the border, which is what a cyclic shift plus the mask amounts to."""
    window = (torch.arange(size) - shift + window_size) // window_size
    return window[:, None] == window[None, :]


def dense_block(block, x):
    """:class:`SwinBlock` recomputed as one attention over all tokens of the zero-padded map,
    restricted to the (offset) windows, with the bias looked up from original coordinates."""
    b, h, w, c = x.shape
    ws, shift, attn = block.window_size, block.shift_size, block.attn
    heads, d = attn.num_heads, c // attn.num_heads
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    y = x.new_zeros(b, hp, wp, c)
    y[:, :h, :w] = block.norm1(x)
    rows, cols = torch.arange(hp * wp) // wp, torch.arange(hp * wp) % wp
    allowed = (
        offset_grid_allowed(hp, ws, shift)[rows][:, rows]
        & offset_grid_allowed(wp, ws, shift)[cols][:, cols]
    )
    dy = (rows[:, None] - rows[None, :]).clamp(-ws + 1, ws - 1) + ws - 1
    dx = (cols[:, None] - cols[None, :]).clamp(-ws + 1, ws - 1) + ws - 1
    bias = attn.relative_position_bias_table[dy * (2 * ws - 1) + dx].permute(2, 0, 1)

    q, k, v = F.linear(y.reshape(b, hp * wp, c), attn.qkv.weight, attn.qkv.bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, hp * wp, heads, d).transpose(1, 2) for t in (q, k, v))
    logits = (q @ k.transpose(-1, -2)) * d**-0.5 + bias
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = (weights @ v).transpose(1, 2).reshape(b, hp, wp, c)[:, :h, :w]
    x = x + attn.proj(out)
    hidden = F.gelu(F.linear(block.norm2(x), block.mlp.fc1.weight, block.mlp.fc1.bias))
    return x + F.linear(hidden, block.mlp.fc2.weight, block.mlp.fc2.bias)


def dense_merging(merging, x):
    """:class:`PatchMerging` through ``pixel_unshuffle`` (channels reordered to the published
    (column offset, row offset, channel) order)."""
    b, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2)).permute(0, 3, 1, 2)
    groups = F.pixel_unshuffle(x, 2)  # [B, C * 4 (row offset, col offset), H / 2, W / 2]
    groups = groups.unflatten(1, (c, 2, 2)).permute(0, 4, 5, 3, 2, 1)  # [B, H/2, W/2, dx, dy, C]
    return merging.reduction(merging.norm(groups.flatten(-3)))


def dense_swin(model, image):
    """:class:`D2SwinTransformer` with the patch embedding as a matrix product over unfolded
    patches, dense blocks and ``pixel_unshuffle`` merging."""
    b, _, h, w = image.shape
    embed = model.patch_embed
    p = embed.patch_size[0]
    hp, wp = math.ceil(h / p), math.ceil(w / p)
    patches = F.unfold(F.pad(image, (0, wp * p - w, 0, hp * p - h)), kernel_size=p, stride=p)
    x = patches.transpose(1, 2) @ embed.proj.weight.flatten(1).T + embed.proj.bias
    x = embed.norm(x.reshape(b, hp, wp, -1))
    if model.absolute_pos_embed is not None:
        pos = F.interpolate(model.absolute_pos_embed, size=(hp, wp), mode="bicubic")
        x = x + pos.permute(0, 2, 3, 1)
    outputs = {}
    for i, stage in enumerate(model.layers):
        for block in stage.blocks:
            x = dense_block(block, x)
        outputs[STAGES[i]] = getattr(model, f"norm{i}")(x).permute(0, 3, 1, 2)
        if stage.downsample is not None:
            x = dense_merging(stage.downsample, x)
    return outputs


# --------------------------------------------------------------------------------- the parts


def test_window_attention_on_one_window_is_multihead_attention_plus_bias():
    attn = WindowAttention(12, window_size=3, num_heads=3).eval()
    x = torch.randn(2, 9, 12)
    mha = torch.nn.MultiheadAttention(12, 3, batch_first=True)
    mha.in_proj_weight.data.copy_(attn.qkv.weight)
    mha.in_proj_bias.data.copy_(attn.qkv.bias)
    mha.out_proj.load_state_dict(attn.proj.state_dict())
    # Bias by explicit loops: the query at (r1, c1) and key at (r2, c2) read row
    # (r1 - r2 + 2) * 5 + (c1 - c2 + 2) of the table (offsets shifted to be >= 0, 5 = 2 * 3 - 1).
    bias = torch.empty(3, 9, 9)
    for i in range(9):
        for j in range(9):
            (r1, c1), (r2, c2) = divmod(i, 3), divmod(j, 3)
            bias[:, i, j] = attn.relative_position_bias_table[(r1 - r2 + 2) * 5 + (c1 - c2 + 2)]
    expected, _ = mha(x, x, x, attn_mask=bias.repeat(2, 1, 1), need_weights=False)
    torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=1e-5)


def test_window_attention_qk_scale():
    attn = WindowAttention(8, window_size=2, num_heads=2, qk_scale=0.0125)
    assert attn.scale == 0.0125
    assert WindowAttention(8, window_size=2, num_heads=2).scale == 4**-0.5


def test_shifted_window_mask_allows_exactly_the_offset_windows():
    ws, shift, hp, wp = 4, 2, 8, 12
    mask = shifted_window_mask(hp, wp, ws, shift)
    assert mask.shape == (hp // ws * wp // ws, ws * ws, ws * ws)
    assert set(mask.unique().tolist()) == {0.0, MASKED_ATTENTION_LOGIT}
    # Token t of rolled window (wr, wc) sits at the original position (rolled + shift) mod size.
    rows_allowed = offset_grid_allowed(hp, ws, shift)
    cols_allowed = offset_grid_allowed(wp, ws, shift)
    for window in range(mask.shape[0]):
        wr, wc = divmod(window, wp // ws)
        r = (wr * ws + torch.arange(ws * ws) // ws + shift) % hp
        c = (wc * ws + torch.arange(ws * ws) % ws + shift) % wp
        allowed = rows_allowed[r][:, r] & cols_allowed[c][:, c]
        assert torch.equal(mask[window] == 0, allowed), window


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 10), (3, 2)])
def test_block_equals_dense_reference(shift, size):
    block = SwinBlock(
        16,
        2,
        window_size=4,
        shift_size=shift,
        mlp_ratio=2.0,
        qkv_bias=True,
        qk_scale=None,
        drop=0.0,
        attn_drop=0.0,
        drop_path=0.0,
    ).eval()
    x = torch.randn(2, *size, 16)
    hp, wp = (math.ceil(s / 4) * 4 for s in size)
    mask = shifted_window_mask(hp, wp, 4, shift) if shift else None
    torch.testing.assert_close(block(x, mask), dense_block(block, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(4, 6), (5, 7)])
def test_patch_merging_equals_pixel_unshuffle(size):
    merging = PatchMerging(3)
    with torch.no_grad():
        merging.norm.weight.uniform_(0.5, 1.5)  # so that a wrong channel order shows
    x = torch.randn(2, *size, 3)
    out = merging(x)
    assert out.shape == (2, math.ceil(size[0] / 2), math.ceil(size[1] / 2), 6)
    torch.testing.assert_close(out, dense_merging(merging, x))


# ------------------------------------------------------------------------------ the backbone


@pytest.mark.parametrize(
    "ape, window_size, pretrain_img_size, size",
    [
        (False, 3, 224, (37, 50)),
        (True, 3, 32, (37, 50)),
        (False, 7, 224, (61, 90)),  # the Tiny/Small window
        (True, 12, 384, (100, 130)),  # the Base/Large window and pre-training size
    ],
)
def test_backbone_equals_dense_reference(ape, window_size, pretrain_img_size, size):
    model = tiny_swin(ape=ape, window_size=window_size, pretrain_img_size=pretrain_img_size)
    model.eval()
    image = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours, expected = model(image), dense_swin(model, image)
    assert list(ours) == STAGES
    for name in STAGES:
        torch.testing.assert_close(ours[name], expected[name], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [(64, 64), (37, 50), (33, 100), (17, 23), (5, 3)])
def test_output_shapes_strides_and_channels(size):
    model = tiny_swin().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    shapes = model.output_shape()
    assert list(out) == list(shapes) == STAGES
    for i, name in enumerate(STAGES):
        stride, channels = 4 * 2**i, 16 * 2**i
        assert shapes[name] == ShapeSpec(channels=channels, stride=stride)
        assert out[name].shape == (
            1,
            channels,
            math.ceil(size[0] / stride),
            math.ceil(size[1] / stride),
        )
        assert torch.isfinite(out[name]).all()
    assert model.size_divisibility == 32


def test_out_features_subset_and_unknown():
    model = tiny_swin(out_features=("res3", "res4")).eval()
    assert list(model.output_shape()) == ["res3", "res4"]
    assert list(model(torch.randn(1, 3, 40, 40))) == ["res3", "res4"]
    assert "norm3.weight" in model.state_dict()  # all norms stay, as in the published layout
    with pytest.raises(ValueError, match="res6"):
        tiny_swin(out_features=("res5", "res6"))
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        tiny_swin(out_features=())
    with pytest.raises(ValueError, match="DEPTHS"):
        tiny_swin(depths=(2, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(torch.randn(3, 40, 40))


def test_gradients_reach_every_parameter():
    model = tiny_swin(ape=True, pretrain_img_size=32).train()
    out = model(torch.randn(2, 3, 37, 50))
    # A random projection: a plain sum of LayerNorm outputs has ~0 gradient upstream.
    loss = sum((v * torch.randn_like(v)).sum() for v in out.values())
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_same_outputs_and_gradients(monkeypatch):
    plain = tiny_swin().train()
    checkpointed = tiny_swin(use_checkpoint=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(function)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    image = torch.randn(1, 3, 37, 50)
    results = []
    for model in (plain, checkpointed):
        out = model(image)
        sum((v * torch.linspace(0, 1, v.numel()).view_as(v)).sum() for v in out.values()).backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    assert len(calls) == sum(TINY["depths"])
    (out_a, grads_a), (out_b, grads_b) = results
    for name in STAGES:
        torch.testing.assert_close(out_a[name], out_b[name])
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], msg=name)
    calls.clear()
    with torch.no_grad():
        checkpointed.eval()(image)
    assert not calls


def test_initialisation_is_the_published_one():
    """As published: the Linear layers keep PyTorch's default initialisation (the published
    truncated-normal ``init_weights`` is never applied), and the position tables are drawn with
    timm's ``trunc_normal_`` of std 0.02 when they are made."""
    torch.manual_seed(0)
    model = tiny_swin(ape=True, pretrain_img_size=24).requires_grad_(False)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for linear in linears:
        bound = 1 / math.sqrt(linear.in_features)  # nn.Linear's default: uniform(-bound, bound)
        assert linear.weight.abs().max() <= bound
        if linear.bias is not None:  # (patch merging has none)
            assert 0 < linear.bias.abs().max() <= bound
    # the default's spread (bound / sqrt(3)), not the truncated normal's 0.02
    qkv = model.layers[0].blocks[0].attn.qkv.weight
    assert qkv.std() == pytest.approx(1 / math.sqrt(3 * qkv.shape[1]), rel=0.15)
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    # (timm's trunc_normal_ cuts at +-2, i.e. at 100 std: in effect a normal distribution)
    assert table.std() == pytest.approx(0.02, rel=0.3)
    assert model.absolute_pos_embed.std() == pytest.approx(0.02, rel=0.3)


def test_drop_path_rises_linearly_and_is_off_in_eval():
    model = tiny_swin(drop_path_rate=0.3)
    rates = [
        getattr(block.drop_path, "drop_prob", 0.0)
        for stage in model.layers
        for block in stage.blocks
    ]
    assert rates == pytest.approx([0.3 * i / 7 for i in range(8)])
    assert isinstance(model.layers[0].blocks[0].drop_path, torch.nn.Identity)
    image = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(image)["res5"], model(image)["res5"])
        model.train()
        assert not torch.equal(model(image)["res5"], model(image)["res5"])


# ----------------------------------------------------------------------------- from configs

SWIN_CONFIGS = {
    # config -> (embed dim, depths, heads, window, pretrain size)
    "configs/ade20k-150/swin/maskformer_swin_tiny_bs16_160k.yaml": (
        96,
        [2, 2, 6, 2],
        [3, 6, 12, 24],
        7,
        224,
    ),
    "configs/ade20k-150/swin/maskformer_swin_small_bs16_160k.yaml": (
        96,
        [2, 2, 18, 2],
        [3, 6, 12, 24],
        7,
        224,
    ),
    "configs/ade20k-150/swin/maskformer_swin_base_IN21k_384_bs16_160k_res640.yaml": (
        128,
        [2, 2, 18, 2],
        [4, 8, 16, 32],
        12,
        384,
    ),
    "configs/ade20k-150/swin/maskformer_swin_large_IN21k_384_bs16_160k_res640.yaml": (
        192,
        [2, 2, 18, 2],
        [6, 12, 24, 48],
        12,
        384,
    ),
}


@pytest.mark.parametrize("config_file", sorted(SWIN_CONFIGS))
def test_published_sizes_build_from_config(config_file):
    embed_dim, depths, heads, window, pretrain = SWIN_CONFIGS[config_file]
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(str(REPO / config_file), allow_unsafe=False)
    assert cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE == pretrain
    with torch.device("meta"):  # shapes only: no memory, no init time
        backbone = build_backbone(cfg)
    assert isinstance(backbone, D2SwinTransformer)
    assert backbone.output_shape() == {
        name: ShapeSpec(channels=embed_dim * 2**i, stride=4 * 2**i) for i, name in enumerate(STAGES)
    }
    assert [len(stage.blocks) for stage in backbone.layers] == depths
    for stage, num_heads in zip(backbone.layers, heads):
        for block in stage.blocks:
            assert block.attn.relative_position_bias_table.shape == (
                (2 * window - 1) ** 2,
                num_heads,
            )
            assert block.attn.relative_position_index.shape == (window**2, window**2)
        assert [b.shift_size for b in stage.blocks] == [0, window // 2] * (len(stage.blocks) // 2)


def test_maskformer_with_swin_trains_on_odd_sizes():
    cfg = tiny_cfg(
        "configs/ade20k-150/swin/maskformer_swin_tiny_bs16_160k.yaml",
        MODEL__SWIN__EMBED_DIM=16,
        MODEL__SWIN__DEPTHS=[2, 2, 2, 2],
        MODEL__SWIN__NUM_HEADS=[1, 2, 2, 4],
        MODEL__SWIN__WINDOW_SIZE=3,
        MODEL__SWIN__DROP_PATH_RATE=0.0,  # else whole branches may be dropped for both images
    )
    model = build_model(cfg).train()
    assert isinstance(model.backbone, D2SwinTransformer)
    losses = model(random_batch([(61, 75), (50, 70)]))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for name, param in model.backbone.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": torch.rand(3, 45, 59) * 255, "height": 45, "width": 59}])
    assert result["sem_seg"].shape == (5, 45, 59)
