#!/usr/bin/env python
"""Writes semantic maps of COCO panoptic (2017) for ``coco_2017_*_panoptic_with_sem_seg``.

Input, under ``--root`` (default ``$DETECTRON2_DATASETS``, else "datasets"):
``coco/annotations/panoptic_{train,val}2017.json`` and ``coco/panoptic_{train,val}2017/*.png``
(the COCO panoptic download, its inner zips unpacked).

Output: ``coco/panoptic_semseg_{train,val}2017/*.png`` (uint8): each segment's pixels hold the
contiguous id of its category among the 133 panoptic classes (things 0..79, stuff 80..132), crowd
segments included; unlabeled pixels hold 255.

Usage: python datasets/prepare_coco_semantic_annos_from_panoptic_annos.py [--root DATASETS]
    [--workers N]
"""

import argparse
import functools
import json
import logging
import multiprocessing
import os

import numpy as np
from panopticapi.utils import rgb2id
from PIL import Image

from mask_former.data.datasets.coco_panoptic import (
    COCO_PANOPTIC_SPLITS,
    IGNORE_LABEL,
    coco_panoptic_metadata,
    coco_panoptic_paths,
)
from mask_former.data.datasets.registration import datasets_root, require_path

logger = logging.getLogger("prepare_coco_semantic_annos_from_panoptic_annos")

DOWNLOAD = "it is part of COCO's panoptic_annotations_trainval2017.zip (https://cocodataset.org)"
LOG_EVERY = 5000


def panoptic_to_semantic(panoptic, segments, id_map):
    """The semantic map of one COCO panoptic annotation.

    Args:
        panoptic (np.ndarray): [H, W, 3] uint8 RGB-encoded segment ids.
        segments (list[dict]): its ``segments_info`` ("id", "category_id").
        id_map (dict[int, int]): COCO category id -> contiguous id.

    Returns:
        np.ndarray: [H, W] uint8 contiguous ids, 255 where no segment is.
    """
    segment_ids = rgb2id(panoptic)
    semantic = np.full(segment_ids.shape, IGNORE_LABEL, np.uint8)
    for segment in segments:
        semantic[segment_ids == segment["id"]] = id_map[segment["category_id"]]
    return semantic


def _convert_file(job, id_map):
    panoptic_path, semantic_path, segments = job
    require_path(panoptic_path, DOWNLOAD)
    panoptic = np.asarray(Image.open(panoptic_path).convert("RGB"))
    Image.fromarray(panoptic_to_semantic(panoptic, segments, id_map)).save(semantic_path)


def convert_split(panoptic_json, panoptic_root, sem_seg_root, workers=1):
    """Writes the semantic maps of every annotation of ``panoptic_json``; returns how many."""
    require_path(panoptic_json, DOWNLOAD)
    require_path(panoptic_root, DOWNLOAD + ", with its panoptic_*2017.zip unpacked")
    with open(panoptic_json) as f:
        annotations = json.load(f)["annotations"]
    os.makedirs(sem_seg_root, exist_ok=True)
    jobs = [
        (
            os.path.join(panoptic_root, a["file_name"]),
            os.path.join(sem_seg_root, a["file_name"]),
            a["segments_info"],
        )
        for a in annotations
    ]
    convert = functools.partial(
        _convert_file, id_map=coco_panoptic_metadata()["stuff_dataset_id_to_contiguous_id"]
    )
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            _log_progress(pool.imap_unordered(convert, jobs, chunksize=16), len(jobs))
    else:
        _log_progress(map(convert, jobs), len(jobs))
    return len(jobs)


def _log_progress(results, total):
    """Consumes the (lazy) results of the conversions, logging every LOG_EVERY."""
    for count, _ in enumerate(results, 1):
        if count % LOG_EVERY == 0:
            logger.info("%d / %d images", count, total)


def prepare_coco_semantic_from_panoptic(root, workers=1):
    """Writes ``coco/panoptic_semseg_{train,val}2017`` under the datasets folder ``root``."""
    for split in COCO_PANOPTIC_SPLITS:
        paths = coco_panoptic_paths(root, split)
        count = convert_split(
            paths["panoptic_json"], paths["panoptic_root"], paths["sem_seg_root"], workers
        )
        logger.info("Wrote %d semantic maps into %s", count, paths["sem_seg_root"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=datasets_root(), help="the datasets folder")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    prepare_coco_semantic_from_panoptic(args.root, args.workers)


if __name__ == "__main__":
    main()
