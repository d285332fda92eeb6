"""The shared steps of every training dataset mapper: read, augment, pad, convert to tensors.

Shapes: ``H, W`` is the image size after augmentation and padding; ``n`` the number of targets.
"""

import abc
import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances

from ..augmentation import build_augmentations, train_ignore_label

__all__ = ["MaskFormerBaseDatasetMapper", "add_mask_boxes", "pad_bottom_right"]

logger = logging.getLogger(__name__)

# Published value of the image padding (before pixel normalisation).
IMAGE_PAD_VALUE = 128


def add_mask_boxes(instances):
    """Sets ``gt_boxes`` [n, 4] of ``instances`` to the boxes of their ``gt_masks`` (all-zero
    boxes for empty masks) and returns them."""
    instances.gt_boxes = BitMasks(instances.gt_masks).get_bounding_boxes()
    return instances


def pad_bottom_right(array, size, value):
    """Pads the last two axes of ``array`` on the bottom and right.

    Args:
        array (np.ndarray): [..., h, w].
        size (tuple[int, int]): (H, W), at least (h, w).
        value: the padding value.

    Returns:
        np.ndarray: [..., H, W].
    """
    pad_h, pad_w = size[0] - array.shape[-2], size[1] - array.shape[-1]
    if pad_h == 0 and pad_w == 0:
        return array
    padding = [(0, 0)] * (array.ndim - 2) + [(0, pad_h), (0, pad_w)]
    return np.pad(array, padding, mode="constant", constant_values=value)


def _num_classes(cfg, class_names_key):
    """Number of classes of the first training dataset: the length of its metadata class list
    (``class_names_key``), else ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``."""
    names = None
    if cfg.DATASETS.TRAIN:
        names = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get(class_names_key)
    return len(names) if names else cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES


class MaskFormerBaseDatasetMapper(abc.ABC):
    """Maps a detectron2 dataset record to a MaskFormer training input.

    Reads the image (and the semantic map when ``reads_sem_seg``), applies the augmentations,
    lets the subclass build the targets (:meth:`build_targets`), checks their class ids, pads to
    ``size_divisibility`` and converts everything to tensors. Subclasses set
    ``augmentation_kind`` (see :func:`mask_former.data.augmentation.build_augmentations`),
    ``class_names_key`` (the metadata list that defines the valid class ids) and
    ``reads_sem_seg``.
    """

    augmentation_kind = "semantic"
    class_names_key = "stuff_classes"
    reads_sem_seg = False

    @configurable
    def __init__(
        self,
        is_train=True,
        *,
        augmentations,
        image_format,
        ignore_label,
        size_divisibility,
        num_classes=None,
        dataset_name=None,
    ):
        """
        Args:
            is_train (bool): must be True: these mappers build training inputs only.
            augmentations (list[Augmentation or Transform]): applied in order.
            image_format (str): ``INPUT.FORMAT``, e.g. "BGR".
            ignore_label (int): semantic label of unlabeled pixels; also pads semantic maps.
            size_divisibility (int): if positive, pad images and targets to exactly this size.
            num_classes (int or None): valid class ids are 0..num_classes-1; None: unchecked.
            dataset_name (str or None): name of the training dataset, for error messages.
        """
        if not is_train:
            raise ValueError(f"{type(self).__name__} builds training inputs only (is_train=False)")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = ignore_label
        self.size_divisibility = size_divisibility
        self.num_classes = num_classes
        self.dataset_name = dataset_name
        logger.info("[%s] Augmentations used in training: %s", type(self).__name__, augmentations)

    @classmethod
    def from_config(cls, cfg, is_train=True):
        return {
            "is_train": is_train,
            "augmentations": build_augmentations(cfg, cls.augmentation_kind),
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": train_ignore_label(cfg),
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "num_classes": _num_classes(cfg, cls.class_names_key),
            "dataset_name": cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None,
        }

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict (dict): one record in detectron2's dataset format (not modified).

        Returns:
            dict: a copy of the record with "image" (uint8 Tensor [3, H, W]), "instances"
            (``Instances`` of size (H, W) with ``gt_classes`` int64 [n] and ``gt_masks`` bool
            [n, H, W]) and, when a semantic map was read, "sem_seg" (int64 Tensor [H, W]).
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image, sem_seg=self._read_sem_seg(dataset_dict))
        transforms = self.augmentations(aug_input)
        classes, masks = self.build_targets(dataset_dict, aug_input, transforms)
        self._check_classes(classes, dataset_dict["file_name"])
        dataset_dict = self._pack(dataset_dict, aug_input, classes, masks)
        return self.finalize_record(dataset_dict, transforms, image.shape[:2])

    @abc.abstractmethod
    def build_targets(self, dataset_dict, aug_input, transforms):
        """Builds the mask targets of one record (implemented by subclasses).

        Args:
            dataset_dict (dict): the record (a copy; may be modified).
            aug_input (AugInput): the augmented ``image`` [h, w, C] and ``sem_seg`` [h, w].
            transforms (TransformList): the transforms that were applied to the image.

        Returns:
            tuple[list[int], list[np.ndarray]]: class ids and [h, w] bool masks (unpadded).
        """

    def finalize_instances(self, instances):
        """Hook for subclasses to add or filter fields of the padded ``instances``."""
        return instances

    def finalize_record(self, dataset_dict, transforms, input_size):
        """Hook for subclasses to add fields to the finished record.

        Args:
            dataset_dict (dict): the record with its tensors.
            transforms (TransformList): the transforms applied to the image.
            input_size (tuple): (h, w) of the image before augmentation.
        """
        return dataset_dict

    def _read_sem_seg(self, dataset_dict):
        """The semantic map as float64 [h, w] (as published), or None if not read / absent."""
        if not self.reads_sem_seg or "sem_seg_file_name" not in dataset_dict:
            return None
        return utils.read_image(dataset_dict.pop("sem_seg_file_name")).astype("double")

    def _check_classes(self, classes, file_name):
        if self.num_classes is None:
            return
        for class_id in classes:
            if not 0 <= class_id < self.num_classes:
                raise ValueError(
                    f"Category id {class_id} of {file_name} is not a class of dataset "
                    f"{self.dataset_name!r}, which has {self.num_classes} classes (contiguous ids "
                    f"0..{self.num_classes - 1}); check the dataset's metadata and id mapping"
                )

    def _padded_size(self, image_size, file_name):
        """(H, W) to pad to: ``size_divisibility`` squared if positive, else the image size."""
        if self.size_divisibility <= 0:
            return tuple(image_size)
        if max(image_size) > self.size_divisibility:
            raise ValueError(
                f"Image {file_name} is {image_size[0]}x{image_size[1]} after augmentation, larger "
                f"than INPUT.SIZE_DIVISIBILITY={self.size_divisibility}; training images are "
                f"padded to exactly that size, so crop them to it first (INPUT.CROP)"
            )
        return (self.size_divisibility, self.size_divisibility)

    def _pack(self, dataset_dict, aug_input, classes, masks):
        """Pads the augmented image, semantic map and masks; stores them as tensors."""
        image = np.ascontiguousarray(aug_input.image.transpose(2, 0, 1))
        size = self._padded_size(image.shape[-2:], dataset_dict["file_name"])
        dataset_dict["image"] = torch.as_tensor(pad_bottom_right(image, size, IMAGE_PAD_VALUE))
        if aug_input.sem_seg is not None:
            sem_seg = aug_input.sem_seg.astype(np.int64)
            sem_seg = pad_bottom_right(sem_seg, size, self.ignore_label)
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg)
        if masks:
            masks = np.stack(masks).astype(bool, copy=False)
        else:
            masks = np.zeros((0, *image.shape[-2:]), dtype=bool)
        instances = Instances(size)
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        instances.gt_masks = torch.as_tensor(pad_bottom_right(masks, size, False))
        dataset_dict["instances"] = self.finalize_instances(instances)
        return dataset_dict
