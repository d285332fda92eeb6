#!/usr/bin/env python
"""Builds ADE20K-150 panoptic annotations (COCO panoptic format) from the semantic and instance
annotations of ADEChallengeData2016.

Input, under ``--root`` (default ``$DETECTRON2_DATASETS``, else "datasets"):
``ADEChallengeData2016/annotations/{training,validation}/*.png`` (semantic: 0 "other", 1..150 the
classes) and ``annotations_instance/{training,validation}/*.png`` (R: the instance challenge's
class, 1..100, G: instance id; from the SceneParsing instance annotations download). Instance
class k is the k-th of the 100 ADE20K instance categories, as in the published mapping file
``ade20k_instance_catid_mapping.txt`` (1 "bed" is ADE20K-150 id 7).

Output: ``ADEChallengeData2016/ade20k_panoptic_{train,val}/*.png`` (segment ids encoded as RGB,
0 = void) and ``ade20k_panoptic_{train,val}.json`` (images, annotations, categories). Category ids
are the 0-based ADE20K-150 ids; image ids the number in the file name (``ADE_train_00000001``
-> 1), as in the instance json of ``prepare_ade20k_ins_seg.py``.

Stuff segments come from the semantic map (one per stuff class), thing segments from the instance
map (one per instance of a thing class), pasted over the stuff where the two overlap. Thing-class
pixels of the semantic map outside every instance are void. Segment ids are 1, 2, ... per image
(stuff first; the published script uses panopticapi's colour-derived ids, which mean the same).
As published, a stuff segment's area and box are those of its whole semantic region, measured
before the things are pasted over it, and a stuff segment the things cover completely is kept:
panopticapi's PQ reads the ground-truth areas from the json, so this keeps PQ comparable with the
published numbers.

Usage: python datasets/prepare_ade20k_pan_seg.py [--root DATASETS]
"""

import argparse
import itertools
import json
import logging
import os

import numpy as np
import pycocotools.mask as mask_util
from panopticapi.utils import id2rgb
from PIL import Image

from mask_former.data.datasets.ade20k import (
    ADE20K_150_CATEGORIES,
    ADE20K_DIR,
    ADE20K_SPLITS,
    ade20k_image_id,
    decode_ade20k_instances,
)
from mask_former.data.datasets.registration import datasets_root, require_path

logger = logging.getLogger("prepare_ade20k_pan_seg")

SEMANTIC_DOWNLOAD = "it is part of ADEChallengeData2016.zip (http://sceneparsing.csail.mit.edu)"
INSTANCE_DOWNLOAD = "it comes with the SceneParsing instance annotations (annotations_instance.tar)"
THING_IDS = frozenset(c["id"] for c in ADE20K_150_CATEGORIES if c["isthing"])
LOG_EVERY = 1000


def segment_info(segment_id, category_id, mask):
    """COCO ``segments_info`` entry of a [H, W] bool mask (bbox XYWH, measured on the mask)."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": segment_id,
        "category_id": category_id,
        "iscrowd": 0,
        "area": int(mask_util.area(rle)),
        "bbox": [int(v) for v in mask_util.toBbox(rle)],
    }


def panoptic_segments(semantic, instances):
    """Combines an ADE20K semantic map and its instances into one panoptic segment map.

    As published: one segment per stuff class of the semantic map, then the thing instances
    pasted over them (thing pixels of the semantic map outside every instance stay void). A stuff
    segment's ``area`` and ``bbox`` are those of its semantic region, measured before the things
    are pasted, so they include pixels an instance took over, and a stuff segment that the
    instances cover completely is kept (panopticapi's PQ reads the ground-truth areas from the
    json, so this keeps PQ comparable with the published numbers).

    Args:
        semantic (np.ndarray): [H, W] uint8, 0 "other", 1..150 the classes.
        instances (np.ndarray): [H, W, 3] uint8 ``annotations_instance`` PNG.

    Returns:
        tuple[np.ndarray, list[dict]]: the [H, W] int32 segment-id map (0 void) and the segments'
        ``segments_info``.
    """
    segment_map = np.zeros(semantic.shape, np.int32)
    segments = []
    stuff = (
        (int(value) - 1, semantic == value)
        for value in np.unique(semantic[semantic > 0])
        if int(value) - 1 not in THING_IDS
    )
    things = ((c, mask) for c, mask in decode_ade20k_instances(instances) if c in THING_IDS)
    for category_id, mask in itertools.chain(stuff, things):
        segment_id = len(segments) + 1
        segment_map[mask] = segment_id
        segments.append(segment_info(segment_id, category_id, mask))
    return segment_map, segments


def convert_split(ade_root, split):
    """Writes the panoptic PNGs and json of one split; returns the json's path."""
    folder = ADE20K_SPLITS[split]
    semantic_dir = os.path.join(ade_root, "annotations", folder)
    instance_dir = os.path.join(ade_root, "annotations_instance", folder)
    require_path(semantic_dir, SEMANTIC_DOWNLOAD)
    require_path(instance_dir, INSTANCE_DOWNLOAD)
    out_dir = os.path.join(ade_root, f"ade20k_panoptic_{split}")
    os.makedirs(out_dir, exist_ok=True)
    names = sorted(f for f in os.listdir(semantic_dir) if f.endswith(".png"))
    images, annotations = [], []
    for count, name in enumerate(names, 1):
        instance_path = os.path.join(instance_dir, name)
        require_path(instance_path, INSTANCE_DOWNLOAD)
        semantic = np.asarray(Image.open(os.path.join(semantic_dir, name)))
        instances = np.asarray(Image.open(instance_path).convert("RGB"))
        segment_map, segments = panoptic_segments(semantic, instances)
        Image.fromarray(id2rgb(segment_map)).save(os.path.join(out_dir, name))
        image_id = ade20k_image_id(name)
        stem = os.path.splitext(name)[0]
        height, width = semantic.shape
        images.append(
            {"id": image_id, "file_name": stem + ".jpg", "height": height, "width": width}
        )
        annotations.append({"image_id": image_id, "file_name": name, "segments_info": segments})
        if count % LOG_EVERY == 0:
            logger.info("%s: %d / %d images", split, count, len(names))
    json_path = os.path.join(ade_root, f"ade20k_panoptic_{split}.json")
    with open(json_path, "w") as f:
        json.dump(
            {"images": images, "annotations": annotations, "categories": ADE20K_150_CATEGORIES}, f
        )
    logger.info("Wrote %s (%d images) and %s", json_path, len(images), out_dir)
    return json_path


def prepare_ade20k_pan_seg(root):
    """Writes the panoptic annotations of both splits of ADEChallengeData2016 under ``root``."""
    for split in ADE20K_SPLITS:
        convert_split(os.path.join(root, ADE20K_DIR), split)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=datasets_root(), help="the datasets folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    prepare_ade20k_pan_seg(args.root)


if __name__ == "__main__":
    main()
