from .mask_former_head import MaskFormerHead
from .mask_former_model import MaskFormer, resolve_family
from .per_pixel_baseline import PerPixelBaselineHead, PerPixelBaselinePlusHead

__all__ = [
    "MaskFormer",
    "MaskFormerHead",
    "PerPixelBaselineHead",
    "PerPixelBaselinePlusHead",
    "resolve_family",
]
