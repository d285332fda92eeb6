"""Mapillary Vistas (v1.2): 65-class semantic and panoptic segmentation.

Registers ``mapillary_vistas_sem_seg_{train,val}`` and ``mapillary_vistas_panoptic_{train,val}``.
The v1.2 download is used as it is (no preparation); layout under ``$DETECTRON2_DATASETS``::

    mapillary_vistas/{training,validation}/
      images/*.jpg
      labels/*.png                       class index 0..64, 65 "Unlabeled" (the ignore label)
      panoptic/*.png, panoptic_2018.json category ids 1..65

Contiguous ids are the label indices (the panoptic category id minus one).
"""

import os

from .registration import (
    datasets_root,
    load_categories,
    panoptic_class_metadata,
    register_panoptic,
    register_sem_seg,
)

__all__ = [
    "MAPILLARY_VISTAS_CATEGORIES",
    "mapillary_vistas_panoptic_categories",
    "register_all_mapillary_vistas",
]

# color, instances (isthing), readable (class name), name (label key), evaluate: the 65 classes
# followed by "Unlabeled", whose index (65) is the ignore label.
MAPILLARY_VISTAS_CATEGORIES = load_categories("mapillary_vistas_66.json")
IGNORE_LABEL = len(MAPILLARY_VISTAS_CATEGORIES) - 1
LABEL_DIVISOR = 1000
# split -> folder
MAPILLARY_VISTAS_SPLITS = {"train": "training", "val": "validation"}


def mapillary_vistas_panoptic_categories():
    """The 65 classes in panoptic json form: id (1..65), name, color, isthing, supercategory."""
    return [
        {
            "id": i + 1,
            "name": c["readable"],
            "color": c["color"],
            "isthing": int(c["instances"]),
            "supercategory": c["name"],
        }
        for i, c in enumerate(MAPILLARY_VISTAS_CATEGORIES[:IGNORE_LABEL])
    ]


def _panoptic_metadata():
    categories = mapillary_vistas_panoptic_categories()
    # As published, every class (not only the things) is listed as a thing class.
    return dict(
        panoptic_class_metadata(categories),
        thing_classes=[c["name"] for c in categories],
        thing_colors=[c["color"] for c in categories],
        json_file=None,
        evaluator_type="mapillary_vistas_panoptic_seg",
        ignore_label=IGNORE_LABEL,
        label_divisor=LABEL_DIVISOR,
    )


def register_all_mapillary_vistas(root):
    """Registers the Mapillary Vistas semantic and panoptic datasets with data under ``root``.

    Args:
        root (str): the datasets folder, like ``$DETECTRON2_DATASETS``.
    """
    classes = MAPILLARY_VISTAS_CATEGORIES[:IGNORE_LABEL]
    sem_seg_metadata = {
        "stuff_classes": [c["readable"] for c in classes],
        "stuff_colors": [c["color"] for c in classes],
        "ignore_label": IGNORE_LABEL,
    }
    panoptic_metadata = _panoptic_metadata()
    for split, folder in MAPILLARY_VISTAS_SPLITS.items():
        split_root = os.path.join(root, "mapillary_vistas", folder)
        image_root = os.path.join(split_root, "images")
        sem_seg_root = os.path.join(split_root, "labels")
        register_sem_seg(
            f"mapillary_vistas_sem_seg_{split}",
            image_root,
            sem_seg_root,
            metadata=sem_seg_metadata,
            script=None,
        )
        paths = {
            "image_root": image_root,
            "panoptic_root": os.path.join(split_root, "panoptic"),
            "panoptic_json": os.path.join(split_root, "panoptic", "panoptic_2018.json"),
        }
        register_panoptic(
            f"mapillary_vistas_panoptic_{split}",
            paths=paths,
            sem_seg_root=sem_seg_root,
            metadata=panoptic_metadata,
            required=dict.fromkeys([*paths.values(), sem_seg_root]),
        )


register_all_mapillary_vistas(datasets_root())
