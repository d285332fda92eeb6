"""ADE20K (SceneParsing, ``ADEChallengeData2016``): 150-class semantic, panoptic and instance.

detectron2 registers ``ade20k_sem_seg_{train,val}``; this module adds their ``stuff_colors`` and
registers ``ade20k_panoptic_{train,val}`` and ``ade20k_instance_{train,val}``. Layout under
``$DETECTRON2_DATASETS`` (``<folder>`` is "training" or "validation", ``<split>`` "train" or
"val")::

    ADEChallengeData2016/
      images/<folder>/ADE_<split>_*.jpg              download
      annotations/<folder>/*.png                     download: 0 "other", 1..150 the classes
      annotations_instance/<folder>/*.png            download: R class (1..150), G instance id
      annotations_detectron2/<folder>/*.png          prepare_ade20k_sem_seg.py: 0..149, 255 void
      ade20k_panoptic_<split>/*.png, .json           prepare_ade20k_pan_seg.py
      ade20k_instance_<split>.json                   prepare_ade20k_ins_seg.py

Category ids in the panoptic and instance jsons are the 0-based ADE20K-150 ids. The panoptic
datasets keep them as contiguous ids (things keep their place among the 150 classes, as
published); the instance datasets number their 100 classes 0..99.
"""

import functools
import os

import numpy as np
from detectron2.data.datasets import load_coco_json

from .registration import (
    datasets_root,
    extend_metadata,
    load_categories,
    panoptic_class_metadata,
    register_dataset,
    register_panoptic,
)

__all__ = [
    "ADE20K_150_CATEGORIES",
    "ADE20K_INSTANCE_CATEGORIES",
    "ADE20K_SPLITS",
    "ade20k_image_id",
    "decode_ade20k_instances",
    "ade20k_instance_metadata",
    "ade20k_panoptic_metadata",
    "register_all_ade20k",
]

# id (0..149), name, isthing, color of the 150 classes (100 of them things).
ADE20K_150_CATEGORIES = load_categories("ade20k_150.json")
# id (ADE20K-150 id) and short name of the 100 instance classes.
ADE20K_INSTANCE_CATEGORIES = load_categories("ade20k_instance_100.json")

ADE20K_DIR = "ADEChallengeData2016"
# split -> folder of the split's images and annotations
ADE20K_SPLITS = {"train": "training", "val": "validation"}
IGNORE_LABEL = 255
LABEL_DIVISOR = 1000
SEM_SEG_SCRIPT = "prepare_ade20k_sem_seg.py"
PANOPTIC_SCRIPT = "prepare_ade20k_pan_seg.py"
INSTANCE_SCRIPT = "prepare_ade20k_ins_seg.py"


def ade20k_image_id(file_name):
    """The image id used in the panoptic and instance jsons: the number in ``ADE_train_00000001.*``.

    Args:
        file_name (str): an image or annotation file name.
    """
    stem = os.path.splitext(os.path.basename(file_name))[0]
    try:
        return int(stem.rsplit("_", 1)[-1])
    except ValueError:
        raise ValueError(
            f"{file_name!r} is not an ADE20K file name (ADE_<split>_<number>)"
        ) from None


def decode_ade20k_instances(annotation):
    """The object instances of an ``annotations_instance`` PNG.

    Args:
        annotation (np.ndarray): [H, W, 3] uint8; R is the instance challenge's class, 1..100 in
            the order of ``ADE20K_INSTANCE_CATEGORIES`` (0: none), G the instance id (0: none).
            As the published preparation scripts do (with ``ade20k_instance_catid_mapping.txt``),
            class k becomes the ADE20K-150 id of the k-th instance category (1, "bed", is 7).

    Returns:
        list[tuple[int, np.ndarray]]: (0-based ADE20K-150 class, [H, W] bool mask) per instance,
        in instance id order. An instance whose pixels carry several classes takes the most
        frequent; instances without a class are dropped.

    Raises:
        ValueError: for an R value above 100.
    """
    classes, instance_ids = annotation[..., 0], annotation[..., 1]
    instances = []
    for instance_id in np.unique(instance_ids[instance_ids > 0]):
        mask = instance_ids == instance_id
        values, counts = np.unique(classes[mask], return_counts=True)
        class_value = int(values[counts.argmax()])
        if class_value > len(ADE20K_INSTANCE_CATEGORIES):
            raise ValueError(
                f"annotations_instance class {class_value} (R channel) of instance {instance_id} "
                f"is not one of the {len(ADE20K_INSTANCE_CATEGORIES)} ADE20K instance classes"
            )
        if class_value > 0:
            instances.append((ADE20K_INSTANCE_CATEGORIES[class_value - 1]["id"], mask))
    return instances


def ade20k_panoptic_metadata():
    """Class names, colours and id maps of ADE20K panoptic (things among all 150 classes)."""
    return panoptic_class_metadata(ADE20K_150_CATEGORIES)


def ade20k_instance_metadata():
    """Class names and id map of the 100 ADE20K instance classes (contiguous ids 0..99)."""
    return {
        "thing_classes": [c["name"] for c in ADE20K_INSTANCE_CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(ADE20K_INSTANCE_CATEGORIES)
        },
    }


def _split_paths(root, split):
    ade_root = os.path.join(root, ADE20K_DIR)
    folder = ADE20K_SPLITS[split]
    return {
        "image_root": os.path.join(ade_root, "images", folder),
        "sem_seg_root": os.path.join(ade_root, "annotations_detectron2", folder),
        "panoptic_root": os.path.join(ade_root, f"ade20k_panoptic_{split}"),
        "panoptic_json": os.path.join(ade_root, f"ade20k_panoptic_{split}.json"),
        "json_file": os.path.join(ade_root, f"ade20k_instance_{split}.json"),
    }


def _register_panoptic(split, paths):
    metadata = dict(
        ade20k_panoptic_metadata(),
        json_file=paths["json_file"],
        evaluator_type="ade20k_panoptic_seg",
        ignore_label=IGNORE_LABEL,
        label_divisor=LABEL_DIVISOR,
    )
    register_panoptic(
        f"ade20k_panoptic_{split}",
        paths={k: paths[k] for k in ("image_root", "panoptic_root", "panoptic_json")},
        sem_seg_root=paths["sem_seg_root"],
        metadata=metadata,
        required={
            paths["image_root"]: None,
            paths["panoptic_json"]: PANOPTIC_SCRIPT,
            paths["panoptic_root"]: PANOPTIC_SCRIPT,
            paths["sem_seg_root"]: SEM_SEG_SCRIPT,
        },
    )


def _register_instance(split, paths):
    name = f"ade20k_instance_{split}"
    metadata = dict(
        ade20k_instance_metadata(),
        json_file=paths["json_file"],
        image_root=paths["image_root"],
        evaluator_type="coco",
    )
    load = functools.partial(load_coco_json, paths["json_file"], paths["image_root"], name)
    required = {paths["image_root"]: None, paths["json_file"]: INSTANCE_SCRIPT}
    register_dataset(name, load, metadata, required)


def register_all_ade20k(root):
    """Registers the ADE20K panoptic and instance datasets and colours detectron2's semantic ones.

    Args:
        root (str): the datasets folder, like ``$DETECTRON2_DATASETS``.
    """
    colors = [c["color"] for c in ADE20K_150_CATEGORIES]
    for split in ADE20K_SPLITS:
        extend_metadata(f"ade20k_sem_seg_{split}", stuff_colors=colors)
        paths = _split_paths(root, split)
        _register_panoptic(split, paths)
        _register_instance(split, paths)


register_all_ade20k(datasets_root())
