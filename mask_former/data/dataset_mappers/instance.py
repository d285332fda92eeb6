"""Instance segmentation mappers: one mask per non-crowd COCO annotation."""

import logging

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.structures import polygons_to_bitmask
from detectron2.utils.logger import log_every_n_seconds

from .base import MaskFormerBaseDatasetMapper, add_mask_boxes, pad_bottom_right

__all__ = [
    "COCOInstanceNewBaselineDatasetMapper",
    "MaskFormerInstanceDatasetMapper",
    "polygons_nonempty",
    "segmentation_to_mask",
    "transform_polygons",
]


def transform_polygons(polygons, transforms):
    """A COCO polygon list in the augmented image (crops clip them; a polygon that leaves the
    crop entirely is dropped, so the list can come back empty), as detectron2's
    ``transform_instance_annotations`` does."""
    polygons = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons]
    return [p.reshape(-1) for p in transforms.apply_polygons(polygons)]


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
        return _rasterise(transform_polygons(segmentation, transforms), output_size)
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


def _rasterise(polygons, output_size):
    if not polygons:
        return np.zeros(output_size, dtype=bool)
    return polygons_to_bitmask(polygons, *output_size)


def polygons_nonempty(polygons) -> bool:
    """Whether detectron2's ``filter_empty_instances`` keeps an instance with these (augmented)
    polygons: at least one polygon, and a polygon bounding box wider and taller than 1e-5."""
    if not polygons:
        return False
    points = np.concatenate([p.reshape(-1, 2) for p in polygons]).astype(np.float32)
    # PolygonMasks.get_bounding_boxes: the upper corner starts at 0, not at -inf.
    width, height = np.maximum(points.max(0), 0) - points.min(0)
    return bool(width > 1e-5 and height > 1e-5)


class MaskFormerInstanceDatasetMapper(MaskFormerBaseDatasetMapper):
    """Training mapper of COCO-format instance datasets (``mask_former_instance``).

    One mask per annotation with ``iscrowd`` 0 (crowd annotations are skipped); class ids are the
    annotations' contiguous ``category_id``. Augmentations: resize, random crop, SSD colour
    jitter, flip.
    """

    augmentation_kind = "instance"
    class_names_key = "thing_classes"
    # Running totals of this mapper (per data-loader worker) for the log line on dropped instances.
    _num_instances = 0
    _num_dropped = 0

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
            segmentation = annotation["segmentation"]
            mask = self._target_mask(segmentation, transforms, input_size, output_size)
            if mask is None:
                continue
            classes.append(int(annotation["category_id"]))
            masks.append(mask)
        dropped = len(annotations) - len(classes)
        self._num_instances += len(annotations)
        self._num_dropped += dropped
        if dropped:
            # Large-scale jitter empties instances in most images: totals, once a minute at most.
            log_every_n_seconds(
                logging.INFO,
                f"{self._num_dropped} of {self._num_instances} instances so far were empty after "
                f"augmentation and were dropped (latest: {dropped} of {len(annotations)} in "
                f"{file_name})",
                n=60,
                name=__name__,
            )
        return classes, masks

    def _target_mask(self, segmentation, transforms, input_size, output_size):
        """The [h, w] bool mask of one annotation, or None to drop it (never here)."""
        return segmentation_to_mask(segmentation, transforms, input_size, output_size)


class COCOInstanceNewBaselineDatasetMapper(MaskFormerInstanceDatasetMapper):
    """Mask2Former's COCO instance mapper (``coco_instance_lsj``): large-scale jitter (flip,
    ResizeScale, FixedSizeCrop to ``INPUT.IMAGE_SIZE`` squared). Adds ``gt_boxes`` (the masks'
    boxes) and, as published, ``padding_mask`` (bool [H, W], True where the crop padded the
    image), and drops the instances that the crop left empty."""

    augmentation_kind = "lsj"

    def _target_mask(self, segmentation, transforms, input_size, output_size):
        """Drops the instances that the augmentation emptied, decided as published: on the
        polygons before rasterising (``filter_empty_instances`` of their ``PolygonMasks``), so a
        sliver that rasterises to no pixel stays a target; on the mask for RLE and arrays."""
        if isinstance(segmentation, list):
            polygons = transform_polygons(segmentation, transforms)
            return _rasterise(polygons, output_size) if polygons_nonempty(polygons) else None
        mask = segmentation_to_mask(segmentation, transforms, input_size, output_size)
        return mask if mask.any() else None

    def finalize_instances(self, instances):
        """Adds ``gt_boxes`` [n, 4], the boxes of the masks (the published ones are the polygons'
        boxes; training does not read them)."""
        return add_mask_boxes(instances)

    def finalize_record(self, dataset_dict, transforms, input_size):
        # A constant map through the same transforms: nearest resizing and cropping keep the
        # marker, padding writes the segmentation pad value (0, or 255 in newer detectron2).
        marker = 1
        covered = transforms.apply_segmentation(np.full(input_size, marker, dtype=np.uint8))
        padding_mask = covered != marker
        size = tuple(dataset_dict["image"].shape[-2:])
        dataset_dict["padding_mask"] = torch.as_tensor(pad_bottom_right(padding_mask, size, True))
        return dataset_dict
