"""MaskFormer and Mask2Former for detectron2.

``import mask_former`` registers the meta-architecture, heads, pixel decoders, transformer decoders,
backbones, dataset mappers and datasets of this package into detectron2's registries.
"""
from . import data  # noqa: F401  (registers datasets)
from . import modeling  # noqa: F401  (registers models)
from .config import add_mask_former_config, add_maskformer2_config

__all__ = ["add_mask_former_config", "add_maskformer2_config"]
