"""Instance segmentation mappers: one mask per non-crowd COCO annotation."""

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import detection_utils as utils
from detectron2.structures import BitMasks, polygons_to_bitmask

from .base import MaskFormerBaseDatasetMapper

__all__ = [
    "COCOInstanceNewBaselineDatasetMapper",
    "MaskFormerInstanceDatasetMapper",
    "segmentation_to_mask",
]


def segmentation_to_mask(segmentation, transforms, input_size, output_size):
    """Rasterises a COCO segmentation in the augmented image.

    Args:
        segmentation (list[list[float]] or dict or np.ndarray): polygons, an RLE (compressed or
            uncompressed) or a [h0, w0] mask, in the coordinates of the original image.
        transforms (TransformList): the transforms applied to the image.
        input_size (tuple[int, int]): (h0, w0) of the original image.
        output_size (tuple[int, int]): (h, w) of the augmented image.

    Returns:
        np.ndarray: [h, w] bool mask.
    """
    if isinstance(segmentation, list):
        # Polygons are transformed as coordinates and rasterised at the output size (as published).
        polygons = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in segmentation]
        polygons = [p.reshape(-1) for p in transforms.apply_polygons(polygons)]
        return polygons_to_bitmask(polygons, *output_size)
    if isinstance(segmentation, dict):
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            segmentation = mask_util.frPyObjects(segmentation, *segmentation["size"])
        segmentation = mask_util.decode(segmentation)
    if not isinstance(segmentation, np.ndarray) or segmentation.ndim != 2:
        raise ValueError(
            f"Cannot convert segmentation of type {type(segmentation).__name__} to a mask; "
            "expected polygons, an RLE dict or a 2D array"
        )
    if segmentation.shape != tuple(input_size):
        raise ValueError(
            f"Mask of shape {segmentation.shape} does not match the image size {tuple(input_size)}"
        )
    mask = transforms.apply_segmentation((segmentation != 0).astype(np.uint8))
    # Padding augmentations fill segmentations with 0 or 255 depending on the detectron2 version.
    return mask == 1


class MaskFormerInstanceDatasetMapper(MaskFormerBaseDatasetMapper):
    """Training mapper of COCO-format instance datasets (``mask_former_instance``).

    One mask per annotation with ``iscrowd`` 0 (crowd annotations are skipped); class ids are the
    annotations' contiguous ``category_id``. Augmentations: resize, random crop, SSD colour
    jitter, flip.
    """

    augmentation_kind = "instance"
    class_names_key = "thing_classes"

    def build_targets(self, dataset_dict, aug_input, transforms):
        """Class ids and masks of the non-crowd annotations; see the base class."""
        file_name = dataset_dict["file_name"]
        if "annotations" not in dataset_dict:
            raise ValueError(f"Cannot find 'annotations' in instance record {file_name}")
        annotations = [a for a in dataset_dict.pop("annotations") if not a.get("iscrowd", 0)]
        # check_image_size has set the original height and width.
        input_size = (dataset_dict["height"], dataset_dict["width"])
        output_size = aug_input.image.shape[:2]
        classes, masks = [], []
        for annotation in annotations:
            if "segmentation" not in annotation:
                raise ValueError(f"An annotation of {file_name} has no 'segmentation'")
            classes.append(int(annotation["category_id"]))
            segmentation = annotation["segmentation"]
            masks.append(segmentation_to_mask(segmentation, transforms, input_size, output_size))
        return classes, masks


class COCOInstanceNewBaselineDatasetMapper(MaskFormerInstanceDatasetMapper):
    """Mask2Former's COCO instance mapper (``coco_instance_lsj``): large-scale jitter (flip,
    ResizeScale, FixedSizeCrop to ``INPUT.IMAGE_SIZE`` squared). Adds ``gt_boxes`` (the masks'
    boxes) and drops the instances that the crop left empty."""

    augmentation_kind = "lsj"

    def finalize_instances(self, instances):
        """Adds ``gt_boxes`` [n, 4] and filters empty instances (``filter_empty_instances``)."""
        masks = BitMasks(instances.gt_masks)
        instances.gt_boxes = masks.get_bounding_boxes()
        instances.gt_masks = masks
        instances = utils.filter_empty_instances(instances)
        instances.gt_masks = instances.gt_masks.tensor
        return instances
