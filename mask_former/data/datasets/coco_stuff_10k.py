"""COCO-Stuff-10K: semantic segmentation with 171 classes (80 things, 91 stuff).

Registers ``coco_2017_{train,test}_stuff_10k_sem_seg``. ``prepare_coco_stuff_10k_sem_seg.py``
converts the ``cocostuff-10k-v1.1`` download; layout under ``$DETECTRON2_DATASETS``::

    coco/coco_stuff_10k/
      imageLists/{train,test}.txt, images/*.jpg, annotations/*.mat   download
      images_detectron2/{train,test}/*.jpg          prepare_coco_stuff_10k_sem_seg.py
      annotations_detectron2/{train,test}/*.png     prepare_coco_stuff_10k_sem_seg.py (0..170, 255)
"""

import os

from .registration import datasets_root, load_categories, register_sem_seg

__all__ = [
    "COCO_STUFF_CATEGORIES",
    "COCO_STUFF_10K_DIR",
    "COCO_STUFF_10K_SPLITS",
    "coco_stuff_metadata",
    "register_all_coco_stuff_10k",
]

# id (the COCO-Stuff label, 1..182 with gaps) and name of the 171 classes, things first.
COCO_STUFF_CATEGORIES = load_categories("coco_stuff_171.json")
COCO_STUFF_10K_DIR = os.path.join("coco", "coco_stuff_10k")
COCO_STUFF_10K_SPLITS = ("train", "test")
IGNORE_LABEL = 255
PREPARE_SCRIPT = "prepare_coco_stuff_10k_sem_seg.py"


def coco_stuff_metadata():
    """Class names and the COCO-Stuff id -> contiguous id map of the 171 classes."""
    return {
        "stuff_classes": [c["name"] for c in COCO_STUFF_CATEGORIES],
        "stuff_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(COCO_STUFF_CATEGORIES)
        },
    }


def register_all_coco_stuff_10k(root):
    """Registers ``coco_2017_{train,test}_stuff_10k_sem_seg`` with data under ``root``.

    Args:
        root (str): the datasets folder, like ``$DETECTRON2_DATASETS``.
    """
    metadata = dict(coco_stuff_metadata(), ignore_label=IGNORE_LABEL)
    for split in COCO_STUFF_10K_SPLITS:
        register_sem_seg(
            f"coco_2017_{split}_stuff_10k_sem_seg",
            os.path.join(root, COCO_STUFF_10K_DIR, "images_detectron2", split),
            os.path.join(root, COCO_STUFF_10K_DIR, "annotations_detectron2", split),
            metadata=metadata,
            script=PREPARE_SCRIPT,
        )


register_all_coco_stuff_10k(datasets_root())
