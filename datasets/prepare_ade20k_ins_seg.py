#!/usr/bin/env python
"""Builds ADE20K instance segmentation annotations (COCO format, 100 thing classes) from the
instance annotations of ADEChallengeData2016.

Input, under ``--root`` (default ``$DETECTRON2_DATASETS``, else "datasets"):
``ADEChallengeData2016/annotations_instance/{training,validation}/*.png`` (R: ADE20K-150 class
plus one, G: instance id; from the SceneParsing instance annotations download).

Output: ``ADEChallengeData2016/ade20k_instance_{train,val}.json`` with one annotation per instance
of the 100 instance classes (RLE masks, no crowd). Category ids are the 0-based ADE20K-150 ids
(e.g. 7 "bed"), image ids the number in the file name (``ADE_train_00000001`` -> 1), as in the
panoptic json of ``prepare_ade20k_pan_seg.py``.

Usage: python datasets/prepare_ade20k_ins_seg.py [--root DATASETS]
"""

import argparse
import json
import logging
import os

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from mask_former.data.datasets.ade20k import (
    ADE20K_DIR,
    ADE20K_INSTANCE_CATEGORIES,
    ADE20K_SPLITS,
    ade20k_image_id,
    decode_ade20k_instances,
)
from mask_former.data.datasets.registration import datasets_root, require_path

logger = logging.getLogger("prepare_ade20k_ins_seg")

INSTANCE_DOWNLOAD = "it comes with the SceneParsing instance annotations (annotations_instance.tar)"
INSTANCE_CLASS_IDS = frozenset(c["id"] for c in ADE20K_INSTANCE_CATEGORIES)
LOG_EVERY = 1000


def instance_annotations(annotation, image_id, first_id):
    """COCO annotations of the instances of one ``annotations_instance`` PNG.

    Args:
        annotation (np.ndarray): [H, W, 3] uint8 (R the instance class 1..100, G the instance id;
            see ``decode_ade20k_instances``).
        image_id (int): the image's id.
        first_id (int): id of the first annotation.

    Returns:
        list[dict]: id, image_id, category_id, segmentation (RLE, counts as str), area, bbox
        (XYWH), iscrowd; instances of classes outside the 100 are left out.
    """
    annotations = []
    for category_id, mask in decode_ade20k_instances(annotation):
        if category_id not in INSTANCE_CLASS_IDS:
            continue
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append(
            {
                "id": first_id + len(annotations),
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_util.area(rle)),
                "bbox": [int(v) for v in mask_util.toBbox(rle)],  # integers, as published
                "iscrowd": 0,
            }
        )
    return annotations


def convert_split(ade_root, split):
    """Writes the instance json of one split; returns its path."""
    instance_dir = os.path.join(ade_root, "annotations_instance", ADE20K_SPLITS[split])
    require_path(instance_dir, INSTANCE_DOWNLOAD)
    names = sorted(f for f in os.listdir(instance_dir) if f.endswith(".png"))
    images, annotations = [], []
    for count, name in enumerate(names, 1):
        annotation = np.asarray(Image.open(os.path.join(instance_dir, name)).convert("RGB"))
        image_id = ade20k_image_id(name)
        height, width = annotation.shape[:2]
        file_name = os.path.splitext(name)[0] + ".jpg"
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        annotations += instance_annotations(annotation, image_id, len(annotations) + 1)
        if count % LOG_EVERY == 0:
            logger.info("%s: %d / %d images", split, count, len(names))
    json_path = os.path.join(ade_root, f"ade20k_instance_{split}.json")
    with open(json_path, "w") as f:
        dataset = {
            "images": images,
            "annotations": annotations,
            "categories": ADE20K_INSTANCE_CATEGORIES,
        }
        json.dump(dataset, f)
    logger.info("Wrote %s: %d images, %d instances", json_path, len(images), len(annotations))
    return json_path


def prepare_ade20k_ins_seg(root):
    """Writes the instance jsons of both splits of ADEChallengeData2016 under ``root``."""
    for split in ADE20K_SPLITS:
        convert_split(os.path.join(root, ADE20K_DIR), split)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=datasets_root(), help="the datasets folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    prepare_ade20k_ins_seg(args.root)


if __name__ == "__main__":
    main()
