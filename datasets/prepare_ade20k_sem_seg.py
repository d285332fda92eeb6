#!/usr/bin/env python
"""Converts the ADE20K-150 (SceneParsing) annotations to the semantic maps detectron2 reads.

Input, under ``--root`` (default ``$DETECTRON2_DATASETS``, else "datasets"): the
ADEChallengeData2016 download, whose ``annotations/{training,validation}/*.png`` hold 0 for
"other" and 1..150 for the classes.

Output: ``ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png`` with the
classes at 0..149 and "other" at 255, the ignore label of detectron2's ``ade20k_sem_seg_*``.

Usage: python datasets/prepare_ade20k_sem_seg.py [--root DATASETS]
"""

import argparse
import logging
import os

import numpy as np
from PIL import Image

from mask_former.data.datasets.ade20k import ADE20K_DIR, ADE20K_SPLITS, IGNORE_LABEL
from mask_former.data.datasets.registration import datasets_root, require_path

logger = logging.getLogger("prepare_ade20k_sem_seg")

NUM_CLASSES = 150
DOWNLOAD = "it is part of ADEChallengeData2016.zip (http://sceneparsing.csail.mit.edu)"


def shift_labels(labels):
    """Moves "other" (0) to the ignore label and the classes 1..150 to 0..149.

    Args:
        labels (np.ndarray): [H, W] uint8, 0..150.

    Returns:
        np.ndarray: [H, W] uint8, 0..149 and 255.
    """
    if labels.max(initial=0) > NUM_CLASSES:
        raise ValueError(f"ADE20K-150 labels are 0..{NUM_CLASSES}; found {labels.max()}")
    return np.where(labels == 0, IGNORE_LABEL, labels.astype(np.int32) - 1).astype(np.uint8)


def convert_folder(src_dir, dst_dir):
    """Converts every ``*.png`` of ``src_dir`` into ``dst_dir``; returns how many."""
    require_path(src_dir, DOWNLOAD)
    os.makedirs(dst_dir, exist_ok=True)
    names = sorted(f for f in os.listdir(src_dir) if f.endswith(".png"))
    for name in names:
        labels = np.asarray(Image.open(os.path.join(src_dir, name)))
        try:
            shifted = shift_labels(labels)
        except ValueError as e:
            raise ValueError(f"{os.path.join(src_dir, name)}: {e}") from None
        Image.fromarray(shifted).save(os.path.join(dst_dir, name))
    return len(names)


def prepare_ade20k_sem_seg(root):
    """Writes ``annotations_detectron2`` for both splits of ADEChallengeData2016 under ``root``."""
    ade_root = os.path.join(root, ADE20K_DIR)
    for folder in ADE20K_SPLITS.values():
        src = os.path.join(ade_root, "annotations", folder)
        dst = os.path.join(ade_root, "annotations_detectron2", folder)
        logger.info("Converted %d annotations of %s into %s", convert_folder(src, dst), src, dst)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=datasets_root(), help="the datasets folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    prepare_ade20k_sem_seg(args.root)


if __name__ == "__main__":
    main()
