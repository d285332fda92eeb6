"""Panoptic segmentation mappers: one mask per non-crowd segment of the panoptic PNG.

The three mappers share their targets and differ in their augmentations (and in whether they
read a semantic map too, as the published mappers do).
"""

from detectron2.data import detection_utils as utils
from panopticapi.utils import rgb2id

from .base import MaskFormerBaseDatasetMapper, add_mask_boxes

__all__ = [
    "COCOPanopticNewBaselineDatasetMapper",
    "DETRPanopticDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
]


class MaskFormerPanopticDatasetMapper(MaskFormerBaseDatasetMapper):
    """Training mapper of panoptic datasets (``mask_former_panoptic``).

    Reads ``pan_seg_file_name`` (segment ids encoded as RGB) and ``segments_info`` (contiguous
    ``category_id``, ``iscrowd``); builds one mask per non-crowd segment, so crowd and void
    pixels are in no mask. Segments that augmentation removes keep an empty mask (as published).
    Also reads ``sem_seg_file_name`` when the record has one and outputs it as "sem_seg".
    Augmentations: as :class:`MaskFormerSemanticDatasetMapper`.
    """

    augmentation_kind = "semantic"
    class_names_key = "stuff_classes"
    reads_sem_seg = True

    def build_targets(self, dataset_dict, aug_input, transforms):
        """Class ids and masks of the non-crowd segments; see the base class."""
        for key in ("pan_seg_file_name", "segments_info"):
            if key not in dataset_dict:
                raise ValueError(
                    f"Cannot find {key!r} in panoptic record {dataset_dict['file_name']} of "
                    f"dataset {self.dataset_name!r}"
                )
        # Transformed as RGB (nearest interpolation keeps the colours) and decoded afterwards.
        pan_seg = utils.read_image(dataset_dict.pop("pan_seg_file_name"), "RGB")
        pan_seg = rgb2id(transforms.apply_segmentation(pan_seg))
        segments = [s for s in dataset_dict["segments_info"] if not s.get("iscrowd", 0)]
        return [int(s["category_id"]) for s in segments], [pan_seg == s["id"] for s in segments]


class COCOPanopticNewBaselineDatasetMapper(MaskFormerPanopticDatasetMapper):
    """Mask2Former's COCO panoptic mapper (``coco_panoptic_lsj``): large-scale jitter (flip,
    ResizeScale, FixedSizeCrop to ``INPUT.IMAGE_SIZE`` squared); no semantic map. Adds
    ``gt_boxes`` (the masks' boxes), as published."""

    augmentation_kind = "lsj"
    reads_sem_seg = False

    def finalize_instances(self, instances):
        return add_mask_boxes(instances)


class DETRPanopticDatasetMapper(MaskFormerPanopticDatasetMapper):
    """MaskFormer's COCO panoptic mapper (``detr_panoptic``): DETR's augmentation (flip + resize,
    or flip + resize + random crop + resize); no semantic map."""

    augmentation_kind = "detr"
    reads_sem_seg = False
