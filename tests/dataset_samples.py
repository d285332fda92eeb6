"""Tiny datasets written in the formats of the real downloads, and the prepare scripts of
``datasets/`` loaded as modules, for test_prepare_datasets.py and test_datasets_registration.py.

Every array is small enough to check by hand; the expected outputs sit in the tests.
"""

import functools
import json
import os
import pickle

import numpy as np
import scipy.io
from conftest import SHARED, load_script
from panopticapi.utils import id2rgb
from PIL import Image

COCO_SAMPLE = SHARED / "data" / "coco_panoptic_sample"


@functools.lru_cache(maxsize=None)
def load_prepare_script(name):
    """Imports ``datasets/<name>.py`` (the folder is not a package) and returns the module.

    The module is put in ``sys.modules``, so that its functions pickle (for worker processes).
    """
    return load_script(f"datasets/{name}.py", f"datasets_{name}", register=True)


def write_png(path, array, palette=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    if palette is not None:
        image.putpalette(palette)
    image.save(path)


def write_jpg(path, height, width):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(height * 1000 + width)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def _rgb(red, green):
    return np.stack([red, green, np.zeros_like(red)], -1)


# ADE20K-150, ADE_val_00000001 (6 x 8). Semantic: 0 other, 1 wall, 4 floor, 8 bed (1-based).
ADE_VAL1_SEMANTIC = np.array(
    [[0, 1, 1, 1, 1, 1, 1, 1]] + [[1] * 8] + [[4, 4, 4, 4, 8, 8, 8, 8]] * 4, np.uint8
)
# Instances (R the instance class, G the instance id): a bed (G 1) on rows 2-5, columns 4-6
# (column 7 stays bed in the semantic map only); a person (G 2) over the wall at rows 0-1,
# columns 6-7; and an instance without a class (G 3) at (5, 0).
_ADE_CLASSES = np.zeros((6, 8), np.uint8)
_ADE_IDS = np.zeros((6, 8), np.uint8)
# R: the instance challenge's classes 1 "bed" (ADE20K-150 id 7) and 4 "person" (id 12).
_ADE_CLASSES[2:, 4:7], _ADE_IDS[2:, 4:7] = 1, 1
_ADE_CLASSES[:2, 6:], _ADE_IDS[:2, 6:] = 4, 2
_ADE_CLASSES[5, 0], _ADE_IDS[5, 0] = 0, 3
ADE_VAL1_INSTANCES = _rgb(_ADE_CLASSES, _ADE_IDS)


def write_ade20k(root):
    """ADEChallengeData2016 with annotations_instance: two val images (one unlabeled) and one
    train image (all sky)."""
    ade = os.path.join(root, "ADEChallengeData2016")
    samples = {
        ("validation", "ADE_val_00000001"): (ADE_VAL1_SEMANTIC, ADE_VAL1_INSTANCES),
        ("validation", "ADE_val_00000002"): (np.zeros((4, 5)), np.zeros((4, 5, 3))),
        ("training", "ADE_train_00000001"): (np.full((4, 5), 3), np.zeros((4, 5, 3))),
    }
    for (folder, stem), (semantic, instances) in samples.items():
        write_jpg(os.path.join(ade, "images", folder, stem + ".jpg"), *semantic.shape)
        write_png(os.path.join(ade, "annotations", folder, stem + ".png"), semantic)
        write_png(os.path.join(ade, "annotations_instance", folder, stem + ".png"), instances)
    return ade


# ADE20K-full class-mask values (R // 10 * 256 + G): 2978 "wall" (id 0), 312 "building" (id 1),
# 5 (not among the 847 classes) and 0 (unlabeled).
WALL, BUILDING, UNKNOWN = 2978, 312, 5
ADE_FULL_TRAIN_MASK = np.array(
    [[WALL] * 8] * 3 + [[BUILDING] * 4 + [UNKNOWN] * 4] * 3, np.int32
)  # 6 x 8
ADE_FULL_VAL_MASK = np.array([[0, WALL, WALL, BUILDING]] * 3, np.int32)  # 3 x 4


def _encode_class_mask(class_mask):
    # R carries the class // 256 times ten (plus a remainder the decoding drops), G class % 256.
    red = class_mask // 256 * 10 + 3 * (class_mask % 2)
    return _rgb(red, class_mask % 256)


def write_ade20k_full(root):
    """ADE20K_2021_17_01 with index_ade20k.pkl: one training and one validation image."""
    folders = {
        "ADE_train_00000001.jpg": (
            "ADE20K_2021_17_01/images/ADE/training/urban/street",
            ADE_FULL_TRAIN_MASK,
        ),
        "ADE_val_00000001.jpg": (
            "ADE20K_2021_17_01/images/ADE/validation/urban/street",
            ADE_FULL_VAL_MASK,
        ),
    }
    for file_name, (folder, class_mask) in folders.items():
        image_path = os.path.join(root, folder, file_name)
        write_jpg(image_path, *class_mask.shape)
        write_png(image_path.replace(".jpg", "_seg.png"), _encode_class_mask(class_mask))
    index = {"filename": list(folders), "folder": [f for f, _ in folders.values()]}
    with open(os.path.join(root, "ADE20K_2021_17_01", "index_ade20k.pkl"), "wb") as f:
        pickle.dump(index, f)
    return os.path.join(root, "ADE20K_2021_17_01")


# COCO-Stuff-10K labels: 0 unlabeled, 1 person, 12 (unused), 92 banner, 182 wood.
COCO_STUFF_LABELS = np.array([[0, 1, 12], [92, 182, 1]], np.uint16)
COCO_STUFF_NAMES = {"train": "COCO_train2014_000000000077", "test": "COCO_train2014_000000000081"}


def write_coco_stuff_10k(root):
    """coco/coco_stuff_10k as unpacked from cocostuff-10k-v1.1.zip: one image per split."""
    base = os.path.join(root, "coco", "coco_stuff_10k")
    os.makedirs(os.path.join(base, "imageLists"))
    os.makedirs(os.path.join(base, "annotations"))
    for split, name in COCO_STUFF_NAMES.items():
        with open(os.path.join(base, "imageLists", f"{split}.txt"), "w") as f:
            f.write(name + "\n")
        write_jpg(os.path.join(base, "images", name + ".jpg"), *COCO_STUFF_LABELS.shape)
        scipy.io.savemat(os.path.join(base, "annotations", name + ".mat"), {"S": COCO_STUFF_LABELS})
    return base


def write_coco_panoptic_val(root):
    """coco/{val2017, panoptic_val2017, annotations/panoptic_val2017.json}: the two real COCO
    panoptic val images of ../shared/data/coco_panoptic_sample (linked)."""
    coco = os.path.join(root, "coco")
    os.makedirs(os.path.join(coco, "annotations"))
    os.symlink(COCO_SAMPLE / "images", os.path.join(coco, "val2017"))
    os.symlink(COCO_SAMPLE / "panoptic", os.path.join(coco, "panoptic_val2017"))
    os.symlink(
        COCO_SAMPLE / "panoptic_examples.json",
        os.path.join(coco, "annotations", "panoptic_val2017.json"),
    )
    return coco


# Mapillary Vistas v1.2, one val image: labels 0 Bird, 2 Curb, 65 Unlabeled; panoptic segments 7
# (Bird, id 1) and 9 (Curb, id 3).
MAPILLARY_STEM = "-0aB_cdEfgh1234"
MAPILLARY_LABELS = np.array([[0, 0, 2], [2, 2, 65]], np.uint8)
MAPILLARY_SEGMENTS = np.array([[7, 7, 9], [9, 9, 0]], np.int32)


def write_mapillary_vistas_val(root):
    """mapillary_vistas/validation in the v1.2 layout (string image id, palette labels)."""
    split = os.path.join(root, "mapillary_vistas", "validation")
    write_jpg(os.path.join(split, "images", MAPILLARY_STEM + ".jpg"), *MAPILLARY_LABELS.shape)
    write_png(
        os.path.join(split, "labels", MAPILLARY_STEM + ".png"), MAPILLARY_LABELS, [0, 0, 0] * 256
    )
    write_png(os.path.join(split, "panoptic", MAPILLARY_STEM + ".png"), id2rgb(MAPILLARY_SEGMENTS))
    segments = [
        {"id": 7, "category_id": 1, "iscrowd": 0, "area": 2, "bbox": [0, 0, 2, 1]},
        {"id": 9, "category_id": 3, "iscrowd": 0, "area": 3, "bbox": [0, 0, 3, 2]},
    ]
    annotation = {"image_id": MAPILLARY_STEM, "file_name": MAPILLARY_STEM + ".png"}
    with open(os.path.join(split, "panoptic", "panoptic_2018.json"), "w") as f:
        json.dump({"annotations": [dict(annotation, segments_info=segments)]}, f)
    return split
