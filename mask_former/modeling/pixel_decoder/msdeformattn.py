"""Mask2Former's pixel decoder: a multi-scale deformable-attention encoder over the coarser
backbone features, then an FPN for the finer ones.

Shape legend:
    B: batch size
    C: the decoder's width (``conv_dim``)
    L: number of encoder levels (3 in the published configs: res5, res4, res3)
    H_l, W_l: height and width of encoder level l (level 0 is the coarsest)
    S: number of encoder positions over all levels, sum_l H_l * W_l

Published quirks kept as named defaults: the encoder uses ``MODEL.MASK_FORMER.NHEADS`` heads,
``ENCODER_NUM_POINTS`` sampling points and an FFN of width ``ENCODER_FEEDFORWARD_DIM``; the config
keys ``MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS`` and ``..._N_HEADS`` exist but
are not read (published configs resolve to the same values either way).
"""

import copy
import logging
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.utils.logger import log_first_n
from fvcore.nn import weight_init
from torch import Tensor, nn

from ...layers import MSDeformAttn
from ...layers.fast_path import cpu_inference_fast_path
from ...layers.ms_deform_attn import IMPLEMENTATIONS
from ..transformer_decoder.mask2former_decoder import CachedPositionEmbeddingSine
from ..transformer_decoder.transformer import get_activation_fn
from .build import PIXEL_DECODER_REGISTRY
from .fpn import NUM_MULTI_SCALE_LEVELS

__all__ = [
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnTransformerEncoderLayer",
    "ENCODER_FEEDFORWARD_DIM",
    "ENCODER_NUM_POINTS",
]

logger = logging.getLogger(__name__)

# Hard-coded by the published pixel decoder (not read from the config, see the module docstring).
ENCODER_FEEDFORWARD_DIM = 1024
ENCODER_NUM_POINTS = 4
# GroupNorm groups of the encoder's input projections (whatever SEM_SEG_HEAD.NORM says).
INPUT_PROJ_GROUPS = 32


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then a feed-forward network; each step is
    followed by a residual connection and LayerNorm (post-norm)."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = ENCODER_FEEDFORWARD_DIM,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 3,
        n_heads: int = 8,
        n_points: int = ENCODER_NUM_POINTS,
        impl: str = "auto",
    ):
        """
        Args:
            d_model (int): C.
            d_ffn (int): hidden width of the feed-forward network.
            dropout (float): dropout after attention, inside and after the feed-forward network.
            activation (str): of the feed-forward network ("relu", "gelu" or "glu").
            n_levels, n_heads, n_points (int): of :class:`MSDeformAttn`.
            impl (str): :class:`MSDeformAttn`'s implementation ("auto", "pytorch", "gather",
                "triton").
        """
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = get_activation_fn(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            src (Tensor): [B, S, C] features of all levels.
            pos (Tensor): [B, S, C] positional encoding (with level embedding), added to queries.
            reference_points (Tensor): [B, S, L, 2] normalised (x, y) of every query on every level.
            spatial_shapes (Tensor): [L, 2] int64 (H_l, W_l).
            level_start_index (Tensor): [L] int64 start of each level in S.
            padding_mask (Tensor or None): [B, S] bool, True at padding.

        Returns:
            Tensor: [B, S, C].
        """
        attended = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout1(attended))
        return self.norm2(src + self.dropout3(self.linear2(self.dropout2(self._hidden(src)))))

    def _hidden(self, src: Tensor) -> Tensor:
        hidden = self.linear1(src)
        if self.activation is F.relu:
            # In place: autograd does not need the linear's output, and the [B, S, d_ffn] buffer
            # is the largest of the layer.
            return F.relu_(hidden)
        return self.activation(hidden)


def encoder_reference_points(
    spatial_shapes: Sequence[Sequence[int]], batch: int, device: torch.device
) -> Tensor:
    """Every pixel centre of every level, normalised by its level's size, as a reference point on
    every level (no padding: all valid ratios are 1).

    Args:
        spatial_shapes: L pairs (H_l, W_l).
        batch (int): B.
        device (torch.device): of the output.

    Returns:
        Tensor: [B, S, L, 2] float32 (x, y) in (0, 1); entry [b, s, l] is the same for all l.
    """
    points = []
    for height, width in spatial_shapes:
        # (i + 0.5) / H is exact in float32 for any realistic H.
        ref_y = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
        ref_x = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ref_y, ref_x, indexing="ij")
        points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), -1))
    points = torch.cat(points, 0)
    return points[None, :, None].expand(batch, -1, len(spatial_shapes), -1)


class MSDeformAttnTransformerEncoder(nn.Module):
    """A stack of :class:`MSDeformAttnTransformerEncoderLayer` (copies of one layer)."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    def forward(self, src, spatial_shapes, level_start_index, pos, padding_mask=None):
        """
        Args:
            src (Tensor): [B, S, C].
            spatial_shapes (Tensor): [L, 2] int64 (H_l, W_l).
            level_start_index (Tensor): [L] int64.
            pos (Tensor): [B, S, C].
            padding_mask (Tensor or None): [B, S] bool, True at padding.

        Returns:
            Tensor: [B, S, C].
        """
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        reference_points = encoder_reference_points(shapes, src.shape[0], src.device)
        output = src
        for layer in self.layers:
            output = layer(
                output, pos, reference_points, spatial_shapes, level_start_index, padding_mask
            )
        return output


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """The deformable-attention encoder over flattened multi-scale features, with a learned
    embedding per level added to the positional encoding (``level_embed``)."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = ENCODER_FEEDFORWARD_DIM,
        dropout: float = 0.1,
        activation: str = "relu",
        num_feature_levels: int = 3,
        enc_n_points: int = ENCODER_NUM_POINTS,
        impl: str = "auto",
    ):
        """
        Args:
            d_model (int): C.
            nhead (int): attention heads.
            num_encoder_layers (int): depth.
            dim_feedforward (int): hidden width of the feed-forward networks.
            dropout (float), activation (str): see :class:`MSDeformAttnTransformerEncoderLayer`.
            num_feature_levels (int): L.
            enc_n_points (int): sampling points per head and level.
            impl (str): :class:`MSDeformAttn`'s implementation.
        """
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        layer = MSDeformAttnTransformerEncoderLayer(
            d_model,
            dim_feedforward,
            dropout,
            activation,
            num_feature_levels,
            nhead,
            enc_n_points,
            impl,
        )
        self.encoder = MSDeformAttnTransformerEncoder(layer, num_encoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self):
        # The published order: xavier on every matrix, then deformable attention's own init
        # (which overrides its matrices), then the level embedding.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: List[Tensor], pos_embeds: List[Tensor]):
        """
        Args:
            srcs (list[Tensor]): L maps [B, C, H_l, W_l], coarsest first.
            pos_embeds (list[Tensor]): L positional encodings [B, C, H_l, W_l].

        Returns:
            memory (Tensor): [B, S, C] encoded features, level by level.
            spatial_shapes (Tensor): [L, 2] int64 (H_l, W_l).
            level_start_index (Tensor): [L] int64 start of each level in S.
        """
        src_flatten, pos_flatten, shapes = [], [], []
        for level, (src, pos) in enumerate(zip(srcs, pos_embeds)):
            shapes.append(tuple(src.shape[-2:]))
            # [B, C, H, W] -> [B, H*W, C]
            src_flatten.append(src.flatten(2).transpose(1, 2))
            pos = pos.flatten(2).transpose(1, 2)
            pos_flatten.append(pos + self.level_embed[level].view(1, 1, -1))
        device = srcs[0].device
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])
        )
        memory = self.encoder(
            torch.cat(src_flatten, 1), spatial_shapes, level_start_index, torch.cat(pos_flatten, 1)
        )
        return memory, spatial_shapes, level_start_index


def _log_unread_keys(head_cfg, used: Dict[str, int]):
    """Warns (once) where a DEFORMABLE_TRANSFORMER_ENCODER_{N_HEADS, N_POINTS} key asks for
    another value than the one the encoder uses (the keys are not read, as published)."""
    for suffix, value in used.items():
        key = f"DEFORMABLE_TRANSFORMER_ENCODER_{suffix}"
        if head_cfg[key] != value:
            log_first_n(
                logging.WARNING,
                f"MODEL.SEM_SEG_HEAD.{key}={head_cfg[key]} is not read (as published): the "
                f"deformable encoder uses {value}.",
                key="message",
            )


def _input_projection(in_channels: int, conv_dim: int) -> nn.Sequential:
    """1x1 conv (with bias) + GroupNorm: the projection of one encoder input level."""
    return nn.Sequential(
        nn.Conv2d(in_channels, conv_dim, kernel_size=1), nn.GroupNorm(INPUT_PROJ_GROUPS, conv_dim)
    )


def _deformable_attention_impl(value: str) -> str:
    """Checks ``MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL``.

    Raises:
        ValueError: naming the key and the accepted values.
    """
    if value not in IMPLEMENTATIONS:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL must be one of {IMPLEMENTATIONS}, "
            f"got {value!r}"
        )
    return value


def _upsample_bilinear(x: Tensor, size: Sequence[int]) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)``, the same values.

    The encoder's maps are views of a [B, H*W, C] tensor, i.e. channels-last. PyTorch's CPU kernel
    resizes such input in channels-last layout and then copies the result into a new contiguous
    tensor, which costs more than the resizing itself; without autograd the result is written
    straight into a channels-last tensor instead (the same kernel, so the same values).
    """
    if not cpu_inference_fast_path(x) or not x.is_contiguous(memory_format=torch.channels_last):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    out = torch.empty(
        (*x.shape[:2], *size), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
    )
    return torch.ops.aten.upsample_bilinear2d.out(x, list(size), False, None, None, out=out)


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """
    The Mask2Former pixel decoder: the features named by ``transformer_in_features`` (res3-res5)
    are projected to ``conv_dim`` (``input_proj``, coarsest first) and encoded jointly by a
    multi-scale deformable-attention encoder (``transformer``); the finer features (res2) are added
    FPN-style (``adapter_i`` lateral 1x1 conv, ``layer_i`` 3x3 conv) to the bilinearly upsampled
    encoder output, down to ``common_stride``; ``mask_features`` (1x1 conv) gives the per-pixel
    embeddings. The 3 coarsest outputs (the encoder levels) feed the masked-attention decoder.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[Union[str, Callable]] = None,
        transformer_in_features: List[str],
        common_stride: int,
        transformer_n_points: int = ENCODER_NUM_POINTS,
        deform_attn_impl: str = "auto",
    ):
        """
        Args:
            input_shape: shapes (channels and stride) of the backbone features the decoder reads.
            transformer_dropout (float): dropout of the encoder.
            transformer_nheads (int): attention heads of the encoder.
            transformer_dim_feedforward (int): FFN width of the encoder.
            transformer_enc_layers (int): encoder depth.
            conv_dim (int): C.
            mask_dim (int): width of the per-pixel embeddings.
            norm (str or callable): normalisation of the FPN convs ("GN" when published).
            transformer_in_features (list[str]): the features the encoder reads.
            common_stride (int): stride of ``mask_features``; FPN levels are added down to it.
            transformer_n_points (int): sampling points per head and level.
            deform_attn_impl (str): :class:`MSDeformAttn`'s implementation ("auto", "pytorch",
                "gather" or "triton"); "auto" picks Triton on CUDA when it imports, else the
                grid_sample core. From ``MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL``.

        Raises:
            ValueError: if a ``transformer_in_features`` entry is not in ``input_shape``, or
                ``common_stride`` is coarser than the encoder's finest level.
        """
        super().__init__()
        missing = sorted(set(transformer_in_features) - set(input_shape))
        if missing:
            raise ValueError(
                f"Deformable encoder features {missing} are not among the pixel decoder's input "
                f"features {sorted(input_shape)} (check SEM_SEG_HEAD.IN_FEATURES)"
            )
        by_stride = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [name for name, _ in by_stride]
        self.feature_channels = [shape.channels for _, shape in by_stride]
        encoder_shapes = [(k, v) for k, v in by_stride if k in transformer_in_features]
        self.transformer_in_features = [name for name, _ in encoder_shapes]
        self.transformer_feature_strides = [shape.stride for _, shape in encoder_shapes]
        self.transformer_num_feature_levels = len(encoder_shapes)

        self.input_proj = self._build_input_proj([s.channels for _, s in encoder_shapes], conv_dim)
        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            nhead=transformer_nheads,
            num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=transformer_n_points,
            impl=deform_attn_impl,
        )
        self.pe_layer = CachedPositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.maskformer_num_feature_levels = NUM_MULTI_SCALE_LEVELS
        self.common_stride = common_stride
        self._build_fpn(conv_dim, norm or "")

    @staticmethod
    def _build_input_proj(channels: List[int], conv_dim: int) -> nn.ModuleList:
        """One 1x1 conv + GroupNorm per encoder level, coarsest level first."""
        input_proj = nn.ModuleList(_input_projection(c, conv_dim) for c in channels[::-1])
        for proj in input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        return input_proj

    def _build_fpn(self, conv_dim: int, norm: str):
        """Lateral (``adapter_i``) and output (``layer_i``) convs of the FPN levels finer than the
        encoder's finest, down to ``common_stride``; registered finest first, kept coarsest first.
        """
        finest = min(self.transformer_feature_strides)
        if finest < self.common_stride:
            raise ValueError(
                f"SEM_SEG_HEAD.COMMON_STRIDE={self.common_stride} is coarser than the deformable "
                f"encoder's finest stride {finest}"
            )
        self.num_fpn_levels = int(math.log2(finest) - math.log2(self.common_stride))
        lateral_convs, output_convs = [], []
        use_bias = norm == ""
        for idx, in_channels in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral_conv = Conv2d(
                in_channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim)
            )
            output_conv = Conv2d(
                conv_dim,
                conv_dim,
                kernel_size=3,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(lateral_conv)
            weight_init.c2_xavier_fill(output_conv)
            self.add_module(f"adapter_{idx + 1}", lateral_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # Top-down order, coarsest first.
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        mf = cfg.MODEL.MASK_FORMER
        _log_unread_keys(head, {"N_HEADS": mf.NHEADS, "N_POINTS": ENCODER_NUM_POINTS})
        if mf.NHEADS < 1 or head.CONVS_DIM % mf.NHEADS:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.CONVS_DIM ({head.CONVS_DIM}) must be a multiple of "
                f"MODEL.MASK_FORMER.NHEADS ({mf.NHEADS}): the deformable encoder has NHEADS heads "
                "(as published)"
            )
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": mf.DROPOUT,
            # Published: the transformer decoder's head count (see the module docstring).
            "transformer_nheads": mf.NHEADS,
            "transformer_dim_feedforward": ENCODER_FEEDFORWARD_DIM,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES,
            "common_stride": head.COMMON_STRIDE,
            "deform_attn_impl": _deformable_attention_impl(head.DEFORMABLE_ATTENTION_IMPL),
        }

    def _encode(self, features: Dict[str, Tensor]) -> List[Tensor]:
        """Runs the encoder and splits its output back into maps.

        Returns:
            list[Tensor]: L maps [B, C, H_l, W_l], coarsest first (views into the encoder output).
        """
        srcs, pos = [], []
        for idx, name in enumerate(self.transformer_in_features[::-1]):
            x = features[name].float()
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
        memory, _, _ = self.transformer(srcs, pos)
        shapes = [tuple(src.shape[-2:]) for src in srcs]
        levels = memory.split([h * w for h, w in shapes], dim=1)
        batch = memory.shape[0]
        # [B, H*W, C] -> [B, C, H, W]
        return [z.transpose(1, 2).view(batch, -1, h, w) for z, (h, w) in zip(levels, shapes)]

    def forward_features(self, features: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """
        Args:
            features (dict[str, Tensor]): backbone features by name, [B, C_f, H_f, W_f].

        Returns:
            mask_features (Tensor): [B, mask_dim, H / common_stride, W / common_stride].
            transformer_encoder_features (Tensor): [B, C, H_0, W_0], the coarsest encoder level.
            multi_scale_features (list[Tensor]): the 3 coarsest outputs [B, C, H_l, W_l] (the
                encoder levels in the published configs), coarsest first.
        """
        # As published, the whole pixel decoder runs in float32 under AMP (autocast off; the
        # deformable attention has no half-precision path): all its outputs are float32.
        device_type = next(iter(features.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            out = self._encode(features)
            for idx, name in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
                lateral = self.lateral_convs[idx](features[name].float())
                upsampled = _upsample_bilinear(out[-1], lateral.shape[-2:])
                out.append(self.output_convs[idx](lateral + upsampled))
            multi_scale_features = out[: self.maskformer_num_feature_levels]
            return self.mask_features(out[-1]), out[0], multi_scale_features

    def forward(self, features, targets=None):
        raise RuntimeError(
            f"{type(self).__name__} is used through forward_features(features); "
            "call that instead of forward()."
        )
