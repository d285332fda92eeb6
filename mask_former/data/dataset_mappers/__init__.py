"""Training dataset mappers, one per published ``INPUT.DATASET_MAPPER_NAME``.

All share :class:`MaskFormerBaseDatasetMapper` (read, augment, pad, tensors); each builds its
own targets. ``DATASET_MAPPERS`` maps the published names to the classes.
"""

from .base import MaskFormerBaseDatasetMapper
from .instance import COCOInstanceNewBaselineDatasetMapper, MaskFormerInstanceDatasetMapper
from .panoptic import (
    COCOPanopticNewBaselineDatasetMapper,
    DETRPanopticDatasetMapper,
    MaskFormerPanopticDatasetMapper,
)
from .semantic import MaskFormerSemanticDatasetMapper

__all__ = [
    "COCOInstanceNewBaselineDatasetMapper",
    "COCOPanopticNewBaselineDatasetMapper",
    "DATASET_MAPPERS",
    "DETRPanopticDatasetMapper",
    "MaskFormerBaseDatasetMapper",
    "MaskFormerInstanceDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerSemanticDatasetMapper",
    "build_train_mapper",
]

# INPUT.DATASET_MAPPER_NAME -> mapper class.
DATASET_MAPPERS = {
    "mask_former_semantic": MaskFormerSemanticDatasetMapper,
    "mask_former_panoptic": MaskFormerPanopticDatasetMapper,
    "mask_former_instance": MaskFormerInstanceDatasetMapper,
    "coco_instance_lsj": COCOInstanceNewBaselineDatasetMapper,
    "coco_panoptic_lsj": COCOPanopticNewBaselineDatasetMapper,
    "detr_panoptic": DETRPanopticDatasetMapper,
}


def build_train_mapper(cfg):
    """Builds the training mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``.

    Args:
        cfg (CfgNode): a config with the MaskFormer keys.

    Returns:
        MaskFormerBaseDatasetMapper: callable on detectron2 dataset records.
    """
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in DATASET_MAPPERS:
        raise KeyError(
            f"Unknown INPUT.DATASET_MAPPER_NAME {name!r}; known: {sorted(DATASET_MAPPERS)}"
        )
    return DATASET_MAPPERS[name](cfg, True)
