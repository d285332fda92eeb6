"""Models: importing this package registers the meta-architecture, heads, backbones, pixel decoders
and transformer decoders into detectron2's (and our own) registries."""

from . import backbone, pixel_decoder, transformer_decoder  # noqa: F401  (registration)
from .backbone import D2SwinTransformer
from .meta_arch import (
    MaskFormer,
    MaskFormerHead,
    PerPixelBaselineHead,
    PerPixelBaselinePlusHead,
    resolve_family,
)
from .pixel_decoder import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .transformer_decoder import TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder

__all__ = [
    "D2SwinTransformer",
    "MaskFormer",
    "MaskFormerHead",
    "PerPixelBaselineHead",
    "PerPixelBaselinePlusHead",
    "resolve_family",
    "PIXEL_DECODER_REGISTRY",
    "build_pixel_decoder",
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
]
