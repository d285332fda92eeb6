#!/usr/bin/env python
"""Converts COCO-Stuff-10K (v1.1) to the semantic maps of ``coco_2017_*_stuff_10k_sem_seg``.

Input, under ``--root`` (default ``$DETECTRON2_DATASETS``, else "datasets"): the
cocostuff-10k-v1.1.zip download unpacked in ``coco/coco_stuff_10k``: ``imageLists/{train,test}.txt``
(image names, one a line), ``images/<name>.jpg`` and ``annotations/<name>.mat`` (MATLAB file whose
"S" holds the COCO-Stuff label of each pixel: 0 unlabeled, 1..182 the classes).

Output: ``coco/coco_stuff_10k/images_detectron2/{train,test}/<name>.jpg`` (copies) and
``annotations_detectron2/{train,test}/<name>.png`` (uint8): labels of the 171 classes become their
contiguous ids 0..170, everything else (unlabeled, unused labels) 255.

Usage: python datasets/prepare_coco_stuff_10k_sem_seg.py [--root DATASETS]
"""

import argparse
import logging
import os
import shutil

import numpy as np
import scipy.io
from PIL import Image

from mask_former.data.datasets.coco_stuff_10k import (
    COCO_STUFF_10K_DIR,
    COCO_STUFF_10K_SPLITS,
    IGNORE_LABEL,
    coco_stuff_metadata,
)
from mask_former.data.datasets.registration import datasets_root, require_path

logger = logging.getLogger("prepare_coco_stuff_10k_sem_seg")

DOWNLOAD = "it is part of cocostuff-10k-v1.1.zip (https://github.com/nightrome/cocostuff10k)"
NUM_LABELS = 256  # the labels fit in a byte
LOG_EVERY = 1000


def label_lookup():
    """[256] uint8 table: COCO-Stuff label -> contiguous id of the 171 classes, 255 elsewhere."""
    lookup = np.full(NUM_LABELS, IGNORE_LABEL, np.uint8)
    for label, contiguous_id in coco_stuff_metadata()["stuff_dataset_id_to_contiguous_id"].items():
        lookup[label] = contiguous_id
    return lookup


def to_contiguous_ids(labels, lookup):
    """Maps a [H, W] label map (0..182) through ``lookup``; returns [H, W] uint8."""
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= len(lookup):
        raise ValueError(f"COCO-Stuff labels are 0..{len(lookup) - 1}")
    return lookup[labels.astype(np.int64)]


def read_image_list(list_path):
    """The image names of ``imageLists/<split>.txt``."""
    require_path(list_path, DOWNLOAD)
    with open(list_path) as f:
        return [line.strip() for line in f if line.strip()]


def convert_split(dataset_dir, split, lookup):
    """Writes the images and semantic maps of one split; returns how many."""
    names = read_image_list(os.path.join(dataset_dir, "imageLists", f"{split}.txt"))
    image_dir = os.path.join(dataset_dir, "images_detectron2", split)
    label_dir = os.path.join(dataset_dir, "annotations_detectron2", split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(label_dir, exist_ok=True)
    for count, name in enumerate(names, 1):
        image_path = os.path.join(dataset_dir, "images", name + ".jpg")
        mat_path = os.path.join(dataset_dir, "annotations", name + ".mat")
        require_path(image_path, DOWNLOAD)
        require_path(mat_path, DOWNLOAD)
        labels = to_contiguous_ids(scipy.io.loadmat(mat_path)["S"], lookup)
        Image.fromarray(labels).save(os.path.join(label_dir, name + ".png"))
        shutil.copyfile(image_path, os.path.join(image_dir, name + ".jpg"))
        if count % LOG_EVERY == 0:
            logger.info("%s: %d / %d images", split, count, len(names))
    return len(names)


def prepare_coco_stuff_10k_sem_seg(root):
    """Converts both splits of COCO-Stuff-10K under the datasets folder ``root``."""
    dataset_dir = os.path.join(root, COCO_STUFF_10K_DIR)
    lookup = label_lookup()
    for split in COCO_STUFF_10K_SPLITS:
        count = convert_split(dataset_dir, split, lookup)
        logger.info("Converted %d %s images of %s", count, split, dataset_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=datasets_root(), help="the datasets folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    prepare_coco_stuff_10k_sem_seg(args.root)


if __name__ == "__main__":
    main()
