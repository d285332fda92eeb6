"""MaskFormer's semantic segmentation mapper: one binary mask per class present in the image."""

import numpy as np

from .base import MaskFormerBaseDatasetMapper

__all__ = ["MaskFormerSemanticDatasetMapper"]


class MaskFormerSemanticDatasetMapper(MaskFormerBaseDatasetMapper):
    """Training mapper of semantic segmentation datasets (``mask_former_semantic``).

    Reads ``sem_seg_file_name`` and turns the augmented map into one mask per present class; the
    ignore label is in no mask. Augmentations: resize, category-area-constrained crop, SSD colour
    jitter, flip. The output also holds "sem_seg" (int64 [H, W], padded with the ignore label).
    """

    augmentation_kind = "semantic"
    class_names_key = "stuff_classes"
    reads_sem_seg = True

    def build_targets(self, dataset_dict, aug_input, transforms):
        """Class ids and masks of the augmented semantic map; see the base class."""
        file_name = dataset_dict["file_name"]
        if "annotations" in dataset_dict:
            raise ValueError(
                f"Semantic segmentation record {file_name} should not have 'annotations'"
            )
        if aug_input.sem_seg is None:
            raise ValueError(
                f"Cannot find 'sem_seg_file_name' for semantic segmentation record {file_name} "
                f"of dataset {self.dataset_name!r}"
            )
        sem_seg = aug_input.sem_seg
        classes = np.unique(sem_seg)
        classes = classes[classes != self.ignore_label].astype(np.int64)
        return classes.tolist(), [sem_seg == class_id for class_id in classes]
