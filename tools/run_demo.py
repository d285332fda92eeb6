"""The project's demo (``make demo``) on the synthetic "shapes" dataset.

For now it generates the dataset (``$DETECTRON2_DATASETS/shapes``) and draws the ground truth of a
few val images (semantic, instance and panoptic) into the output folder.

Usage::

    python tools/run_demo.py [--output output/demo] [--num-vis 4] [--num-train N] [--num-val N]
"""

import argparse
import logging
import os
import time

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from PIL import Image

import mask_former  # noqa: F401  (registers the shapes datasets)
from mask_former.data.datasets.shapes import (
    NUM_IMAGES_ENV,
    num_images_from_env,
    prepare_shapes_dataset,
)

logger = logging.getLogger("mask_former.run_demo")

VIS_SCALE = 2.0  # the images are small (128-256 px): upscale so that labels stay legible
# task -> (registered val dataset, keys of its records that the drawing may use)
GROUND_TRUTH_VIEWS = {
    "sem_seg": ("shapes_sem_seg_val", ("file_name", "sem_seg_file_name")),
    "instances": ("shapes_instance_val", ("file_name", "annotations")),
    "panoptic": ("shapes_panoptic_val", ("file_name", "pan_seg_file_name", "segments_info")),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="output/demo", help="folder for the visualisations")
    parser.add_argument("--num-vis", type=int, default=4, help="val images to visualise")
    parser.add_argument(
        "--num-train", type=int, default=None, help="train images (default: 1000, or env var)"
    )
    parser.add_argument("--num-val", type=int, default=None, help="val images (default: 100)")
    return parser.parse_args(argv)


def prepare_data(args):
    """Generates the shapes dataset unless it is already there.

    Sizes given on the command line are exported to the environment variables that the
    registered dataset loaders read, so that every later ``DatasetCatalog.get`` agrees.

    Returns:
        dict[str, str]: split name -> split folder.
    """
    for split, num_images in (("train", args.num_train), ("val", args.num_val)):
        if num_images is not None:
            os.environ[NUM_IMAGES_ENV[split]] = str(num_images)
    start = time.perf_counter()
    split_dirs = prepare_shapes_dataset(
        num_train=num_images_from_env("train"), num_val=num_images_from_env("val")
    )
    logger.info("Shapes dataset ready in %.1f s: %s", time.perf_counter() - start, split_dirs)
    return split_dirs


def draw_ground_truth(record, metadata):
    """Draws one record's annotations over its image; returns an [H, W, 3] uint8 RGB array."""
    image = read_image(record["file_name"], format="RGB")
    visualizer = Visualizer(image, metadata, scale=VIS_SCALE)
    return visualizer.draw_dataset_dict(record).get_image()


def visualize_ground_truth(output_dir, num_images):
    """Writes ``<stem>_<task>.png`` for the first val images of each shapes dataset.

    Returns:
        list[str]: the written files.
    """
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for task, (dataset_name, keys) in GROUND_TRUTH_VIEWS.items():
        metadata = MetadataCatalog.get(dataset_name)
        for record in DatasetCatalog.get(dataset_name)[:num_images]:
            # Panoptic records also name a semantic PNG; draw only the view this file is about.
            view = {key: record[key] for key in keys}
            stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
            path = os.path.join(output_dir, f"{stem}_{task}.png")
            Image.fromarray(np.ascontiguousarray(draw_ground_truth(view, metadata))).save(path)
            written.append(path)
    return written


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="mask_former")
    setup_logger()
    prepare_data(args)
    written = visualize_ground_truth(args.output, args.num_vis)
    logger.info(
        "Wrote %d ground-truth visualisations to %s", len(written), os.path.abspath(args.output)
    )


if __name__ == "__main__":
    main()
