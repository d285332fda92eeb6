"""COCO panoptic (2017) with semantic maps, for semantic evaluation of panoptic models.

detectron2 registers ``coco_2017_{train,val}_panoptic`` with every class as a "thing class"; as
published, their ``thing_classes`` / ``thing_colors`` are replaced by the 80 thing classes. This
module registers ``coco_2017_{train,val}_panoptic_with_sem_seg``: the same records plus
``sem_seg_file_name``. Layout under ``$DETECTRON2_DATASETS``::

    coco/
      {train,val}2017/*.jpg                                   download
      annotations/panoptic_{train,val}2017.json               download
      annotations/instances_{train,val}2017.json              download (instance evaluation)
      panoptic_{train,val}2017/*.png                          download
      panoptic_semseg_{train,val}2017/*.png                   0..132, 255 void: written by
                                          prepare_coco_semantic_annos_from_panoptic_annos.py
"""

import os

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .registration import datasets_root, extend_metadata, panoptic_class_metadata, register_panoptic

__all__ = [
    "COCO_PANOPTIC_SPLITS",
    "coco_panoptic_metadata",
    "coco_panoptic_paths",
    "register_all_coco_panoptic",
]

COCO_PANOPTIC_SPLITS = ("train", "val")
IGNORE_LABEL = 255
LABEL_DIVISOR = 1000
SEM_SEG_SCRIPT = "prepare_coco_semantic_annos_from_panoptic_annos.py"


def coco_panoptic_metadata():
    """Class names, colours and id maps of the 133 COCO panoptic classes (80 things first)."""
    return panoptic_class_metadata(COCO_CATEGORIES)


def coco_panoptic_paths(root, split):
    """Paths of one split of COCO panoptic under the datasets folder ``root``."""
    coco = os.path.join(root, "coco")
    return {
        "image_root": os.path.join(coco, f"{split}2017"),
        "panoptic_root": os.path.join(coco, f"panoptic_{split}2017"),
        "panoptic_json": os.path.join(coco, "annotations", f"panoptic_{split}2017.json"),
        "sem_seg_root": os.path.join(coco, f"panoptic_semseg_{split}2017"),
        "json_file": os.path.join(coco, "annotations", f"instances_{split}2017.json"),
    }


def register_all_coco_panoptic(root):
    """Registers ``coco_2017_{train,val}_panoptic_with_sem_seg``; sets the thing classes of
    detectron2's ``coco_2017_{train,val}_panoptic``.

    Args:
        root (str): the datasets folder, like ``$DETECTRON2_DATASETS``.
    """
    classes = coco_panoptic_metadata()
    for split in COCO_PANOPTIC_SPLITS:
        name = f"coco_2017_{split}_panoptic"
        extend_metadata(
            name, thing_classes=classes["thing_classes"], thing_colors=classes["thing_colors"]
        )
        paths = coco_panoptic_paths(root, split)
        metadata = dict(
            classes,
            sem_seg_root=paths["sem_seg_root"],
            json_file=paths["json_file"],
            evaluator_type="coco_panoptic_seg",
            ignore_label=IGNORE_LABEL,
            label_divisor=LABEL_DIVISOR,
        )
        required = {paths[k]: None for k in ("image_root", "panoptic_json", "panoptic_root")}
        required[paths["sem_seg_root"]] = SEM_SEG_SCRIPT
        register_panoptic(
            f"{name}_with_sem_seg",
            paths={k: paths[k] for k in ("image_root", "panoptic_root", "panoptic_json")},
            sem_seg_root=paths["sem_seg_root"],
            metadata=metadata,
            required=required,
        )


register_all_coco_panoptic(datasets_root())
