"""MaskFormer's pixel decoders: a plain FPN, and an FPN whose coarsest level is a transformer
encoder output."""

from typing import Callable, Dict, Optional, Union

import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from fvcore.nn import weight_init
from torch import nn

from ..transformer_decoder.position_encoding import PositionEmbeddingSine
from ..transformer_decoder.transformer import TransformerEncoderOnly
from .build import PIXEL_DECODER_REGISTRY

__all__ = ["BasePixelDecoder", "TransformerEncoderPixelDecoder"]

# Multi-scale features returned for a masked-attention decoder: the 3 coarsest FPN levels.
NUM_MULTI_SCALE_LEVELS = 3


def _conv3x3(in_channels, out_channels, norm):
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size=3,
        stride=1,
        padding=1,
        bias=norm == "",
        norm=get_norm(norm, out_channels),
        activation=F.relu,
    )
    weight_init.c2_xavier_fill(conv)
    return conv


def _conv1x1(in_channels, out_channels, norm):
    conv = Conv2d(
        in_channels, out_channels, kernel_size=1, bias=norm == "", norm=get_norm(norm, out_channels)
    )
    weight_init.c2_xavier_fill(conv)
    return conv


@PIXEL_DECODER_REGISTRY.register()
class BasePixelDecoder(nn.Module):
    """
    FPN over the backbone features: a 3x3 conv on the coarsest feature, then for each finer
    feature a 1x1 lateral conv (``adapter_i``) added to the nearest-upsampled coarser result and a
    3x3 conv (``layer_i``), all with ``norm``; a final 3x3 conv (``mask_features``) gives the
    per-pixel embeddings at the finest stride.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[Union[str, Callable]] = None,
    ):
        """
        Args:
            input_shape: shapes (channels and stride) of the input features.
            conv_dim (int): width of the FPN.
            mask_dim (int): width of the per-pixel embeddings.
            norm (str or callable): normalization of the FPN convs ("GN" in the published configs).
        """
        super().__init__()
        norm = norm or ""
        input_shape = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [name for name, _ in input_shape]
        channels = [shape.channels for _, shape in input_shape]

        # Modules are registered finest level first (adapter_1, layer_1, adapter_2, ...) so that
        # state_dict keys come in the published order; lists are kept coarsest first, the order
        # of the top-down pass.
        lateral_convs, output_convs = [], []
        for idx, in_channels in enumerate(channels):
            if idx == len(channels) - 1:
                lateral_conv = None
                output_conv = _conv3x3(in_channels, conv_dim, norm)
            else:
                lateral_conv = _conv1x1(in_channels, conv_dim, norm)
                output_conv = _conv3x3(conv_dim, conv_dim, norm)
                self.add_module(f"adapter_{idx + 1}", lateral_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=3, stride=1, padding=1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.maskformer_num_feature_levels = NUM_MULTI_SCALE_LEVELS

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
        }

    def _coarsest_level(self, x):
        """Top of the FPN (overridden by the transformer-encoder variant)."""
        return self.output_convs[0](x), None

    def forward_features(self, features):
        """
        Args:
            features (dict[str, Tensor]): backbone features by name.

        Returns:
            mask_features (Tensor): [B, mask_dim, H_finest, W_finest].
            transformer_encoder_features (Tensor or None): the encoder output, if any.
            multi_scale_features (list[Tensor]): the 3 coarsest FPN outputs, coarsest first.
        """
        multi_scale_features = []
        encoder_features = None
        y = None
        for idx, name in enumerate(self.in_features[::-1]):
            x = features[name]
            if idx == 0:
                y, encoder_features = self._coarsest_level(x)
            else:
                lateral = self.lateral_convs[idx](x)
                y = self.output_convs[idx](
                    lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
                )
            if len(multi_scale_features) < self.maskformer_num_feature_levels:
                multi_scale_features.append(y)
        return self.mask_features(y), encoder_features, multi_scale_features

    def forward(self, features, targets=None):
        raise RuntimeError(
            f"{type(self).__name__} is used through forward_features(features); "
            "call that instead of forward()."
        )


@PIXEL_DECODER_REGISTRY.register()
class TransformerEncoderPixelDecoder(BasePixelDecoder):
    """
    :class:`BasePixelDecoder` whose coarsest level first goes through a 1x1 projection
    (``input_proj``) and a transformer encoder with sine positional encoding; the encoder output is
    also returned for the transformer decoder (TRANSFORMER_IN_FEATURE "transformer_encoder").
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
        transformer_pre_norm: bool,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[Union[str, Callable]] = None,
    ):
        """
        Args:
            transformer_*: the encoder's dropout, heads, FFN width, layers and pre-norm.
            Others as :class:`BasePixelDecoder`.
        """
        super().__init__(input_shape, conv_dim=conv_dim, mask_dim=mask_dim, norm=norm)
        coarsest = max(input_shape.values(), key=lambda s: s.stride)
        self.input_proj = Conv2d(coarsest.channels, conv_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.input_proj)
        self.transformer = TransformerEncoderOnly(
            d_model=conv_dim,
            dropout=transformer_dropout,
            nhead=transformer_nheads,
            dim_feedforward=transformer_dim_feedforward,
            num_encoder_layers=transformer_enc_layers,
            normalize_before=transformer_pre_norm,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        # The coarsest 3x3 conv now reads the encoder output (conv_dim channels). It is registered
        # again under the same name so that it comes last in the state_dict, as published.
        name = f"layer_{len(self.in_features)}"
        delattr(self, name)
        output_conv = _conv3x3(conv_dim, conv_dim, norm or "")
        self.add_module(name, output_conv)
        self.output_convs[0] = output_conv

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        mf = cfg.MODEL.MASK_FORMER
        ret.update(
            transformer_dropout=mf.DROPOUT,
            transformer_nheads=mf.NHEADS,
            transformer_dim_feedforward=mf.DIM_FEEDFORWARD,
            transformer_enc_layers=cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS,
            transformer_pre_norm=mf.PRE_NORM,
        )
        return ret

    def _coarsest_level(self, x):
        encoded = self.transformer(self.input_proj(x), None, self.pe_layer(x))
        return self.output_convs[0](encoded), encoded
