"""MaskFormer and Mask2Former for detectron2.

``import mask_former`` registers the meta-architecture, heads, pixel decoders, transformer decoders,
backbones, dataset mappers and datasets of this package into detectron2's registries. The names
the published ``mask_former`` and ``mask2former`` packages export at their top level are exported
here too.
"""

from . import (
    data,  # noqa: F401  (registers datasets)
    modeling,  # noqa: F401  (registers models)
)
from .config import add_mask_former_config, add_maskformer2_config
from .data.dataset_mappers import (
    COCOInstanceNewBaselineDatasetMapper,
    COCOPanopticNewBaselineDatasetMapper,
    DETRPanopticDatasetMapper,
    MaskFormerInstanceDatasetMapper,
    MaskFormerPanopticDatasetMapper,
    MaskFormerSemanticDatasetMapper,
)
from .evaluation import InstanceSegEvaluator
from .modeling import MaskFormer
from .test_time_augmentation import SemanticSegmentorWithTTA

__all__ = [
    "add_mask_former_config",
    "add_maskformer2_config",
    "COCOInstanceNewBaselineDatasetMapper",
    "COCOPanopticNewBaselineDatasetMapper",
    "DETRPanopticDatasetMapper",
    "MaskFormerInstanceDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerSemanticDatasetMapper",
    "InstanceSegEvaluator",
    "MaskFormer",
    "SemanticSegmentorWithTTA",
]
