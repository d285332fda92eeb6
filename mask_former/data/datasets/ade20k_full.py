"""ADE20K-full: semantic segmentation with the 847 most frequent classes of ADE20K (2021 release).

Registers ``ade20k_full_sem_seg_{train,val}``. ``prepare_ade20k_full_sem_seg.py`` converts the
``ADE20K_2021_17_01`` download; layout under ``$DETECTRON2_DATASETS``::

    ADE20K_2021_17_01/
      index_ade20k.pkl, images/ADE/...                   download
      images_detectron2/{training,validation}/*.jpg      prepare_ade20k_full_sem_seg.py
      annotations_detectron2/{training,validation}/*.tif uint16 class ids 0..846, 65535 void

The maps are 16-bit TIFFs because 847 classes do not fit in 8 bits.
"""

import os

from .ade20k import ADE20K_SPLITS
from .registration import datasets_root, load_categories, register_sem_seg

__all__ = ["ADE20K_FULL_CATEGORIES", "ADE20K_FULL_DIR", "IGNORE_LABEL", "register_all_ade20k_full"]

# name, id (the ADE20K class-mask value) and trainId (the contiguous id) of the 847 classes.
ADE20K_FULL_CATEGORIES = load_categories("ade20k_full_847.json")
ADE20K_FULL_DIR = "ADE20K_2021_17_01"
IGNORE_LABEL = 65535
PREPARE_SCRIPT = "prepare_ade20k_full_sem_seg.py"


def register_all_ade20k_full(root):
    """Registers ``ade20k_full_sem_seg_{train,val}`` with data under ``root``.

    Args:
        root (str): the datasets folder, like ``$DETECTRON2_DATASETS``.
    """
    metadata = {
        "stuff_classes": [c["name"] for c in ADE20K_FULL_CATEGORIES],
        "ignore_label": IGNORE_LABEL,
    }
    for split, folder in ADE20K_SPLITS.items():
        register_sem_seg(
            f"ade20k_full_sem_seg_{split}",
            os.path.join(root, ADE20K_FULL_DIR, "images_detectron2", folder),
            os.path.join(root, ADE20K_FULL_DIR, "annotations_detectron2", folder),
            metadata=metadata,
            script=PREPARE_SCRIPT,
            gt_ext="tif",
        )


register_all_ade20k_full(datasets_root())
