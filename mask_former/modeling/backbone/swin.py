"""Swin Transformer backbone (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using
Shifted Windows", 2021) in the layout of the segmentation variant that MaskFormer and Mask2Former
use, so that their published checkpoints load key for key.

Shape legend:
    B: batch size              H, W: height and width of a feature map (in tokens)
    C: channels of a stage     ws: window size, N = ws * ws tokens per window
    nW: windows per image      h: attention heads

Inside the backbone, feature maps are kept channels-last, [B, H, W, C], which is the layout
``nn.LayerNorm`` and ``nn.Linear`` act on; the backbone outputs are channels-first [B, C, H, W].
"""

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from torch import Tensor, nn

__all__ = [
    "D2SwinTransformer",
    "PatchEmbed",
    "PatchMerging",
    "SwinBlock",
    "SwinStage",
    "WindowAttention",
    "relative_position_index",
    "shifted_window_mask",
    "window_merge",
    "window_partition",
]

# Attention logit added between tokens of a shifted window that come from different image regions
# (the published value; large enough that softmax gives them ~0 weight).
MASKED_ATTENTION_LOGIT = -100.0
# Standard deviation of the truncated-normal initialization of weights and position tables.
INIT_STD = 0.02


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """
    Args:
        x (Tensor): [B, H, W, C], H and W multiples of ``window_size``.

    Returns:
        Tensor: [B * nW, ws * ws, C] windows, image-major, then row by row.
    """
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_merge(windows: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """
    Inverse of :func:`window_partition`.

    Args:
        windows (Tensor): [B * nW, ws * ws, C].
        height, width (int): size of the feature map the windows tile.

    Returns:
        Tensor: [B, H, W, C].
    """
    rows, cols = height // window_size, width // window_size
    c = windows.shape[-1]
    x = windows.view(-1, rows, cols, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(window_size: int) -> Tensor:
    """
    Row of the relative-position bias table for each (query, key) token pair of a window.

    Returns:
        Tensor: [N, N] int64; the pair at offset (dy, dx) = query - key reads row
        ``(dy + ws - 1) * (2 * ws - 1) + (dx + ws - 1)`` of the table.
    """
    rows, cols = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    dy = rows[:, None] - rows[None, :] + window_size - 1
    dx = cols[:, None] - cols[None, :] + window_size - 1
    return dy * (2 * window_size - 1) + dx


def shifted_window_mask(
    height: int, width: int, window_size: int, shift_size: int, device=None
) -> Tensor:
    """
    Attention mask of a cyclically shifted (padded) feature map: the shift wraps the first
    ``shift_size`` rows and columns around to the bottom and right, so the windows there hold
    tokens that are not neighbours in the image; tokens attend only to tokens that were wrapped
    alike (along each axis).

    Args:
        height, width (int): size of the padded feature map, multiples of ``window_size``.
        shift_size (int): the cyclic shift, 0 < shift_size < window_size.

    Returns:
        Tensor: [nW, N, N], 0 within a group and ``MASKED_ATTENTION_LOGIT`` across groups.
    """

    def wrapped(size):
        return (torch.arange(size, device=device) >= size - shift_size).long()

    labels = wrapped(height)[:, None] * 2 + wrapped(width)[None, :]
    labels = window_partition(labels[None, :, :, None], window_size).squeeze(-1)
    different = labels[:, :, None] != labels[:, None, :]
    return different.float() * MASKED_ATTENTION_LOGIT


class WindowAttention(nn.Module):
    """
    Multi-head self-attention within a window, with a learned bias per head for each relative
    position (``relative_position_bias_table``, [(2 ws - 1)^2, h]).
    """

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        """
        Args:
            dim (int): channels C of the tokens.
            window_size (int): side ws of the square windows.
            num_heads (int): attention heads h; must divide ``dim``.
            qkv_bias (bool): whether the query/key/value projection has a bias.
            qk_scale (float or None): logit scale; None: head_dim ** -0.5.
            attn_drop, proj_drop (float): dropout on the attention weights and on the output.
        """
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide {dim} channels")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop_prob = attn_drop
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        # Persistent: the published checkpoints hold it.
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=INIT_STD)

    def relative_position_bias(self) -> Tensor:
        """Returns: [h, N, N] the bias added to the attention logits of every window."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, windows: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            windows (Tensor): [B * nW, N, C] tokens, grouped by window.
            mask (Tensor or None): [nW, N, N] logits added to the windows of each image.

        Returns:
            Tensor: [B * nW, N, C].
        """
        num_windows, n, c = windows.shape
        qkv = self.qkv(windows).view(num_windows, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B * nW, h, N, C / h]
        # Explicit logits in the published order of operations (scale q, product, + bias, + mask),
        # so that outputs round as the published backbone's do.
        logits = (q * self.scale) @ k.transpose(-2, -1) + self.relative_position_bias()
        if mask is not None:
            # Image-major windows: view the batch as [B, nW] so the mask broadcasts over images.
            per_image = mask.shape[0]
            logits = logits.view(-1, per_image, self.num_heads, n, n) + mask[:, None]
            logits = logits.view(num_windows, self.num_heads, n, n)
        attn = F.dropout(logits.softmax(dim=-1), self.attn_drop_prob, self.training)
        out = (attn @ v).transpose(1, 2).reshape(num_windows, n, c)
        return self.proj_drop(self.proj(out))


class SwinBlock(nn.Module):
    """
    A transformer block whose self-attention is restricted to non-overlapping windows, shifted by
    ``shift_size`` tokens (towards the top left, cyclically) in every other block of a stage.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: Optional[float],
        drop: float,
        attn_drop: float,
        drop_path: float,
    ):
        """
        Args:
            dim, num_heads, window_size, qkv_bias, qk_scale, attn_drop: see
                :class:`WindowAttention`.
            shift_size (int): cyclic shift of the windows, 0 or ``window_size // 2``.
            mlp_ratio (float): hidden width of the MLP, relative to ``dim``.
            drop (float): dropout after the attention projection and in the MLP.
            drop_path (float): stochastic-depth rate of both residual branches.
        """
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim,
            window_size,
            num_heads,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=drop,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
        """
        Args:
            x (Tensor): [B, H, W, C].
            attn_mask (Tensor or None): [nW, N, N] from :func:`shifted_window_mask` of the padded
                size; used only by shifted blocks.

        Returns:
            Tensor: [B, H, W, C].
        """
        x = self._attend(x, attn_mask)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _attend(self, x: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
        """The attention branch with its residual: [B, H, W, C] -> [B, H, W, C]."""
        _, height, width, _ = x.shape
        ws, shift = self.window_size, self.shift_size
        # Pad after the norm, as published: the padding tokens are zeros that windows attend to.
        y = F.pad(self.norm1(x), (0, 0, 0, -width % ws, 0, -height % ws))
        padded_h, padded_w = y.shape[1:3]
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        windows = self.attn(window_partition(y, ws), attn_mask if shift else None)
        y = window_merge(windows, ws, padded_h, padded_w)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        return x + self.drop_path(y[:, :height, :width])


class PatchMerging(nn.Module):
    """Halves the resolution and doubles the channels: each 2x2 group of tokens is concatenated
    (4 C), normalized and projected to 2 C."""

    def __init__(self, dim: int):
        """
        Args:
            dim (int): channels C of the input tokens.
        """
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x (Tensor): [B, H, W, C]; odd H or W are padded with a row/column of zeros.

        Returns:
            Tensor: [B, ceil(H / 2), ceil(W / 2), 2 C].
        """
        _, height, width, _ = x.shape
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # The published channel order: (even row, even col), (odd, even), (even, odd), (odd, odd).
        groups = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
        return self.reduction(self.norm(torch.cat(groups, dim=-1)))


class SwinStage(nn.Module):
    """``depth`` Swin blocks at one resolution, alternating unshifted and shifted windows, then an
    optional :class:`PatchMerging` that makes the input of the next stage."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: Optional[float],
        drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        downsample: bool,
        use_checkpoint: bool = False,
    ):
        """
        Args:
            dim, num_heads, window_size, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop: see
                :class:`SwinBlock`.
            depth (int): number of blocks.
            drop_path (list[float]): stochastic-depth rate of each block.
            downsample (bool): whether to end with a :class:`PatchMerging`.
            use_checkpoint (bool): recompute each block in the backward pass (saves memory).
        """
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window_size=window_size,
                shift_size=0 if i % 2 == 0 else self.shift_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """
        Args:
            x (Tensor): [B, H, W, C].

        Returns:
            (Tensor, Tensor or None): the stage output [B, H, W, C] and, with ``downsample``, the
            next stage's input [B, ceil(H / 2), ceil(W / 2), 2 C].
        """
        _, height, width, _ = x.shape
        attn_mask = None
        if self.shift_size and len(self.blocks) > 1:
            ws = self.window_size
            padded_h, padded_w = height + -height % ws, width + -width % ws
            attn_mask = shifted_window_mask(padded_h, padded_w, ws, self.shift_size, x.device)
        for block in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
        return x, self.downsample(x) if self.downsample is not None else None


class PatchEmbed(nn.Module):
    """Splits the image into non-overlapping patches and embeds each with a strided conv."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int, *, norm: bool):
        """
        Args:
            patch_size (int): side of the square patches (the conv's kernel and stride).
            in_channels (int): image channels.
            embed_dim (int): channels of the embeddings.
            norm (bool): whether to apply a LayerNorm to the embeddings.
        """
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.proj = nn.Conv2d(
            in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, image: Tensor) -> Tensor:
        """
        Args:
            image (Tensor): [B, C_in, H, W]; padded with zeros at the bottom/right to a multiple
                of the patch size.

        Returns:
            Tensor: [B, ceil(H / patch), ceil(W / patch), embed_dim].
        """
        height, width = image.shape[-2:]
        patch_h, patch_w = self.patch_size
        image = F.pad(image, (0, -width % patch_w, 0, -height % patch_h))
        x = self.proj(image).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(Backbone):
    """
    Swin Transformer as a detectron2 backbone: a patch embedding, then stages of shifted-window
    blocks separated by patch merging; stage ``i`` outputs ``res{i + 2}`` (LayerNorm ``norm{i}``)
    at stride ``patch_size * 2 ** i`` with ``embed_dim * 2 ** i`` channels. Inputs of any size
    work: feature maps are padded to the patch size, the window size and even sizes as needed.
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int = 3,
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.3,
        ape: bool = False,
        patch_norm: bool = True,
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        use_checkpoint: bool = False,
    ):
        """
        Args:
            in_channels (int): image channels.
            pretrain_img_size (int): image size of the pre-training; sets the grid of the
                absolute position embedding.
            patch_size (int): stride of the patch embedding.
            embed_dim (int): channels of the first stage; each later stage doubles them.
            depths (list[int]): blocks per stage.
            num_heads (list[int]): attention heads per stage.
            window_size (int): side of the attention windows.
            mlp_ratio, qkv_bias, qk_scale: see :class:`SwinBlock`.
            drop_rate (float): dropout after the embedding, the attention and in the MLPs.
            attn_drop_rate (float): dropout on the attention weights.
            drop_path_rate (float): stochastic depth, rising linearly from 0 over all blocks to
                this rate.
            ape (bool): add a learned absolute position embedding (resized bicubically).
            patch_norm (bool): LayerNorm after the patch embedding.
            out_features (list[str]): stages to output, among ``res2`` ... ``res{len(depths)+1}``.
            use_checkpoint (bool): gradient checkpointing of every block.
        """
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"DEPTHS {list(depths)} and NUM_HEADS {list(num_heads)} differ")
        stage_names = [f"res{i + 2}" for i in range(len(depths))]
        unknown = sorted(set(out_features) - set(stage_names))
        if unknown or not out_features:
            raise ValueError(f"OUT_FEATURES {list(out_features)}: choose among {stage_names}")
        self._stage_names = stage_names
        self._out_features = [name for name in stage_names if name in out_features]
        self._out_feature_strides = {name: patch_size * 2**i for i, name in enumerate(stage_names)}
        self._out_feature_channels = {name: embed_dim * 2**i for i, name in enumerate(stage_names)}

        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim, norm=patch_norm)
        if ape:
            grid = [
                size // patch
                for size, patch in zip(to_2tuple(pretrain_img_size), to_2tuple(patch_size))
            ]
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *grid))
            trunc_normal_(self.absolute_pos_embed, std=INIT_STD)
        else:
            self.register_parameter("absolute_pos_embed", None)
        self.pos_drop = nn.Dropout(drop_rate)
        self.layers = self._build_stages(
            embed_dim,
            depths,
            num_heads,
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            drop=drop_rate,
            attn_drop=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            use_checkpoint=use_checkpoint,
        )
        # One norm per stage, whether output or not: the published checkpoints hold all of them.
        for i, name in enumerate(stage_names):
            self.add_module(f"norm{i}", nn.LayerNorm(self._out_feature_channels[name]))
        # As published, the Linear layers keep PyTorch's default initialisation: the published
        # backbone defines a truncated-normal init_weights but never applies it (the ImageNet
        # checkpoints replace these weights anyway; this keeps the random stream, and with it the
        # initial head weights at a given seed, as published).

    @staticmethod
    def _build_stages(embed_dim, depths, num_heads, *, drop_path_rate, **block_args):
        """The stages (``layers``), each but the last ending with a patch merging."""
        # On the CPU explicitly, so that building under a `torch.device("meta")` context works.
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, first = nn.ModuleList(), 0
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            stages.append(
                SwinStage(
                    embed_dim * 2**i,
                    depth,
                    heads,
                    drop_path=rates[first : first + depth],
                    downsample=i < len(depths) - 1,
                    **block_args,
                )
            )
            first += depth
        return stages

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        swin = cfg.MODEL.SWIN
        return {
            "in_channels": input_shape.channels,
            "pretrain_img_size": swin.PRETRAIN_IMG_SIZE,
            "patch_size": swin.PATCH_SIZE,
            "embed_dim": swin.EMBED_DIM,
            "depths": swin.DEPTHS,
            "num_heads": swin.NUM_HEADS,
            "window_size": swin.WINDOW_SIZE,
            "mlp_ratio": swin.MLP_RATIO,
            "qkv_bias": swin.QKV_BIAS,
            "qk_scale": swin.QK_SCALE,
            "drop_rate": swin.DROP_RATE,
            "attn_drop_rate": swin.ATTN_DROP_RATE,
            "drop_path_rate": swin.DROP_PATH_RATE,
            "ape": swin.APE,
            "patch_norm": swin.PATCH_NORM,
            "out_features": swin.OUT_FEATURES,
            "use_checkpoint": swin.USE_CHECKPOINT,
        }

    @property
    def size_divisibility(self) -> int:
        # The coarsest stride (32), as published: images padded to it keep every stage aligned.
        return max(self._out_feature_strides.values())

    def forward(self, image: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            image (Tensor): [B, C_in, H, W], any H and W.

        Returns:
            dict[str, Tensor]: each of ``out_features``, [B, C_i, ceil(H / s_i), ceil(W / s_i)]
            for its channels C_i and stride s_i.
        """
        if image.dim() != 4:
            raise ValueError(
                f"D2SwinTransformer takes [B, C, H, W] inputs, got {tuple(image.shape)}"
            )
        x = self.patch_embed(image)
        if self.absolute_pos_embed is not None:
            pos = F.interpolate(self.absolute_pos_embed, size=x.shape[1:3], mode="bicubic")
            x = x + pos.permute(0, 2, 3, 1)
        x = self.pos_drop(x)
        outputs = {}
        last = self._stage_names.index(self._out_features[-1])
        for i, stage in enumerate(self.layers[: last + 1]):
            out, x = stage(x)
            name = self._stage_names[i]
            if name in self._out_features:
                norm = getattr(self, f"norm{i}")
                outputs[name] = norm(out).permute(0, 3, 1, 2).contiguous()
        return outputs
