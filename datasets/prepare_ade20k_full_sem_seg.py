#!/usr/bin/env python
"""Converts ADE20K (release 2021_17_01) to ADE20K-full: 847-class semantic maps.

Input, under ``--root`` (default ``$DETECTRON2_DATASETS``, else "datasets"): the
ADE20K_2021_17_01 download. ``index_ade20k.pkl`` lists the images ("filename", "folder"; folders
are relative to the datasets folder, e.g. "ADE20K_2021_17_01/images/ADE/training/urban/street").
Next to each image ``<name>.jpg`` lies ``<name>_seg.png``, whose class mask is
``R // 10 * 256 + G`` (ADE20K's own decoding).

Output: ``ADE20K_2021_17_01/images_detectron2/{training,validation}/<name>.jpg`` and
``annotations_detectron2/{training,validation}/<name>.tif`` (uint16): class-mask values of the 847
ADE20K-full classes become their contiguous ids 0..846 (the published selection of the most
frequent classes, ``ADE20K_FULL_CATEGORIES``), every other value 65535 (ignored). Images named
``ADE_val_*`` go to validation, all others to training.

Images whose shorter side exceeds 512 pixels are downscaled to 512 (bilinear; labels nearest).
Every image is re-encoded as JPEG at PIL's default quality, resized or not, as the published
conversion does.

Usage: python datasets/prepare_ade20k_full_sem_seg.py [--root DATASETS] [--max-short-side 512]
"""

import argparse
import logging
import os
import pickle

import cv2
import numpy as np
from PIL import Image

from mask_former.data.datasets.ade20k_full import (
    ADE20K_FULL_CATEGORIES,
    ADE20K_FULL_DIR,
    IGNORE_LABEL,
)
from mask_former.data.datasets.registration import datasets_root, require_path

logger = logging.getLogger("prepare_ade20k_full_sem_seg")

DOWNLOAD = "it is part of the ADE20K_2021_17_01 download (https://ade20k.csail.mit.edu)"
INDEX_FILE = "index_ade20k.pkl"
MAX_SHORT_SIDE = 512
JPEG_QUALITY = 75  # PIL's default, which the published conversion uses
LOG_EVERY = 1000


def decode_class_mask(segmentation):
    """ADE20K's class mask of a ``*_seg.png``.

    Args:
        segmentation (np.ndarray): [H, W, 3] uint8 RGB.

    Returns:
        np.ndarray: [H, W] int32, ``R // 10 * 256 + G`` (0: unlabeled).
    """
    red, green = segmentation[..., 0].astype(np.int32), segmentation[..., 1].astype(np.int32)
    return red // 10 * 256 + green


def class_mask_lookup(categories=ADE20K_FULL_CATEGORIES):
    """A table mapping class-mask values to contiguous ids: [max id + 1] uint16, 65535 elsewhere."""
    lookup = np.full(max(c["id"] for c in categories) + 1, IGNORE_LABEL, np.uint16)
    lookup[[c["id"] for c in categories]] = [c["trainId"] for c in categories]
    return lookup


def to_contiguous_ids(class_mask, lookup):
    """Maps a class mask [H, W] through ``lookup``; values beyond the table become 65535."""
    labels = np.full(class_mask.shape, IGNORE_LABEL, np.uint16)
    known = class_mask < len(lookup)
    labels[known] = lookup[class_mask[known]]
    return labels


def resized_shape(height, width, max_short_side=MAX_SHORT_SIDE):
    """(height, width) with the shorter side brought down to ``max_short_side``; None if it fits."""
    short = min(height, width)
    if short <= max_short_side:
        return None
    scale = max_short_side / short
    return round(height * scale), round(width * scale)


def split_of(file_name):
    """The output folder of an image: validation for ``ADE_val_*``, training for the others."""
    return "validation" if file_name.startswith("ADE_val_") else "training"


def convert_image(image_path, out_dir, lookup, max_short_side=MAX_SHORT_SIDE):
    """Writes the image and its contiguous-id map of one ADE20K image.

    Args:
        image_path (str): ``<name>.jpg``; ``<name>_seg.png`` must lie next to it.
        out_dir (str): the ``ADE20K_2021_17_01`` folder that receives ``images_detectron2`` and
            ``annotations_detectron2``.
        lookup (np.ndarray): from :func:`class_mask_lookup`.
        max_short_side (int): images with a longer shorter side are downscaled.
    """
    seg_path = os.path.splitext(image_path)[0] + "_seg.png"
    require_path(image_path, DOWNLOAD)
    require_path(seg_path, DOWNLOAD)
    file_name = os.path.basename(image_path)
    split = split_of(file_name)
    image_out = os.path.join(out_dir, "images_detectron2", split, file_name)
    label_out = os.path.join(
        out_dir, "annotations_detectron2", split, os.path.splitext(file_name)[0] + ".tif"
    )
    labels = to_contiguous_ids(decode_class_mask(np.asarray(Image.open(seg_path))), lookup)
    shape = resized_shape(*labels.shape, max_short_side)
    image = np.asarray(Image.open(image_path).convert("RGB"))
    if shape is not None:
        size = (shape[1], shape[0])
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    # Re-encoded even when not resized, as published (the pixels differ from the source JPEG's).
    Image.fromarray(image).save(image_out, quality=JPEG_QUALITY)
    Image.fromarray(labels).save(label_out)


def read_index(dataset_dir):
    """The (folder, file name) of every image listed in ``index_ade20k.pkl``."""
    index_path = os.path.join(dataset_dir, INDEX_FILE)
    require_path(index_path, DOWNLOAD)
    with open(index_path, "rb") as f:
        index = pickle.load(f)
    return list(zip(index["folder"], index["filename"]))


def prepare_ade20k_full_sem_seg(root, max_short_side=MAX_SHORT_SIDE):
    """Converts every image of ``index_ade20k.pkl`` under the datasets folder ``root``."""
    dataset_dir = os.path.join(root, ADE20K_FULL_DIR)
    entries = read_index(dataset_dir)
    for kind in ("images_detectron2", "annotations_detectron2"):
        for split in ("training", "validation"):
            os.makedirs(os.path.join(dataset_dir, kind, split), exist_ok=True)
    lookup = class_mask_lookup()
    for count, (folder, file_name) in enumerate(entries, 1):
        convert_image(os.path.join(root, folder, file_name), dataset_dir, lookup, max_short_side)
        if count % LOG_EVERY == 0 or count == len(entries):
            logger.info("Converted %d / %d images", count, len(entries))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=datasets_root(), help="the datasets folder")
    parser.add_argument("--max-short-side", type=int, default=MAX_SHORT_SIDE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    prepare_ade20k_full_sem_seg(args.root, args.max_short_side)


if __name__ == "__main__":
    main()
