"""The project's main job (``make demo``): learn the synthetic "shapes" dataset from scratch on CPU.

1. generates the shapes dataset under ``$DETECTRON2_DATASETS/shapes`` (if needed);
2. trains a small model with ``train_net.py`` (progress is printed every 20 iterations);
3. evaluates it on shapes val (semantic mIoU, panoptic PQ, instance mask AP; train_net.py does this
   at the end of training);
4. writes, into the output folder, predictions next to the ground truth for a few val images
   (``vis/<image>.png``), the loss curve (``loss_curve.png``) and a metrics summary
   (``metrics.json``), and prints where they are.

Usage::

    python tools/run_demo.py [--config-file configs/shapes/maskformer_R18_shapes.yaml]
        [--output output/demo] [--num-vis 4] [--max-iter N] [--skip-training] [KEY VALUE ...]
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image

import mask_former  # noqa: F401  (registers the model and the shapes datasets)
from mask_former import add_mask_former_config
from mask_former.data.datasets.shapes import (
    NUM_IMAGES_ENV,
    num_images_from_env,
    prepare_shapes_dataset,
)
from mask_former.engine import cpu_bf16_enabled, tune_malloc

logger = logging.getLogger("mask_former.run_demo")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "configs/shapes/maskformer_R18_shapes.yaml"
# The default config trains under bfloat16 autocast (SOLVER.AMP.CPU_BF16), 0.30-0.33 s per
# iteration on the development machine. A CPU without native bfloat16 trains in float32 instead
# (0.35-0.37 s there), so the demo then runs the iterations that fit the same time (README, demo).
FLOAT32_MAX_ITER = 2300
VIS_SCALE = 2.0  # the images are small (128-256 px): upscale so that labels stay legible
SCORE_THRESHOLD = 0.5  # instances drawn in the visualisations
# Result keys of detectron2's evaluators -> names in the summary.
METRICS = {
    "sem_seg/mIoU": "mIoU",
    "panoptic_seg/PQ": "PQ",
    "panoptic_seg/PQ_th": "PQ_things",
    "panoptic_seg/PQ_st": "PQ_stuff",
    "segm/AP": "mask_AP",
    "segm/AP50": "mask_AP50",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--output", default="output/demo", help="output folder")
    parser.add_argument("--num-vis", type=int, default=4, help="val images to visualise")
    parser.add_argument("--max-iter", type=int, default=None, help="override SOLVER.MAX_ITER")
    parser.add_argument(
        "--skip-training",
        action="store_true",
        help="reuse <output>/train/model_final.pth and its metrics",
    )
    parser.add_argument("--num-train", type=int, default=None, help="train images (default 1000)")
    parser.add_argument("--num-val", type=int, default=None, help="val images (default 100)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def prepare_data(args):
    """Generates the shapes dataset unless it is already there.

    Sizes given on the command line are exported to the environment variables that the
    registered dataset loaders read (in this process and in train_net.py's).

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


def demo_max_iter(args):
    """``--max-iter``; else, for the default config trained in float32 (a CPU without native
    bfloat16, or ``SOLVER.AMP.CPU_BF16 False`` among the overrides), FLOAT32_MAX_ITER (logged);
    else None (the config's)."""
    default_config = os.path.realpath(os.path.join(REPO, DEFAULT_CONFIG))
    if args.max_iter is not None or os.path.realpath(args.config_file) != default_config:
        return args.max_iter
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *args.opts])
    if cpu_bf16_enabled(cfg):  # logs why not when SOLVER.AMP.CPU_BF16 is set
        return None
    logger.warning(
        "The demo trains in float32: %d iterations instead of the config's (pass --max-iter to "
        "choose)",
        FLOAT32_MAX_ITER,
    )
    return FLOAT32_MAX_ITER


def config_overrides(args, train_dir):
    overrides = ["OUTPUT_DIR", train_dir, "MODEL.DEVICE", "cpu"]
    if args.max_iter is not None:
        overrides += ["SOLVER.MAX_ITER", str(args.max_iter)]
    return overrides + list(args.opts)


def train(args, train_dir):
    """Trains and evaluates with train_net.py in a child process; returns its wall time (s)."""
    command = [
        sys.executable,
        os.path.join(REPO, "train_net.py"),
        "--config-file",
        args.config_file,
        "--num-gpus",
        "1",
        *config_overrides(args, train_dir),
    ]
    logger.info("Training: %s", " ".join(command))
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO)
    if completed.returncode != 0:
        raise RuntimeError(
            f"train_net.py failed with exit code {completed.returncode}; "
            f"see {os.path.join(train_dir, 'log.txt')}"
        )
    return time.perf_counter() - start


def read_metrics(train_dir):
    """Reads detectron2's metrics.json (one JSON object per line).

    Returns:
        losses (list[tuple[int, float]]): (iteration, total_loss) of the logged iterations.
        results (dict[str, float]): the final evaluation, named as in METRICS.
    """
    path = os.path.join(train_dir, "metrics.json")
    losses, results = [], {}
    with open(path) as f:
        for line in f:
            entry = json.loads(line)
            if "total_loss" in entry:
                losses.append((entry["iteration"], entry["total_loss"]))
            results.update({name: entry[key] for key, name in METRICS.items() if key in entry})
    if not results:
        raise RuntimeError(f"{path} holds no evaluation results; did training finish?")
    return losses, results


def plot_loss_curve(losses, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([i for i, _ in losses], [v for _, v in losses])
    ax.set_xlabel("iteration")
    ax.set_ylabel("total loss (train)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def load_predictor(args, train_dir):
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(config_overrides(args, train_dir))
    cfg.MODEL.WEIGHTS = os.path.join(train_dir, "model_final.pth")
    cfg.freeze()
    return cfg, DefaultPredictor(cfg)


def draw_prediction(image, prediction, metadata):
    """Draws panoptic, instance and semantic predictions; returns three RGB arrays."""
    panoptic_seg, segments_info = prediction["panoptic_seg"]
    instances = prediction["instances"].to("cpu")
    instances = instances[instances.scores > SCORE_THRESHOLD]
    sem_seg = prediction["sem_seg"].argmax(0).to("cpu")
    return [
        Visualizer(image, metadata, scale=VIS_SCALE)
        .draw_panoptic_seg(panoptic_seg.to("cpu"), segments_info)
        .get_image(),
        Visualizer(image, metadata, scale=VIS_SCALE, instance_mode=ColorMode.IMAGE)
        .draw_instance_predictions(instances)
        .get_image(),
        Visualizer(image, metadata, scale=VIS_SCALE).draw_sem_seg(sem_seg).get_image(),
    ]


def draw_ground_truth(image, record, metadata):
    """Draws a panoptic record's segments, instance by instance, and its semantic map."""
    views = [
        {k: record[k] for k in ("file_name", "pan_seg_file_name", "segments_info")},
        {k: record[k] for k in ("file_name", "annotations")},
        {k: record[k] for k in ("file_name", "sem_seg_file_name")},
    ]
    return [
        Visualizer(image, metadata, scale=VIS_SCALE).draw_dataset_dict(v).get_image() for v in views
    ]


def visualize(cfg, predictor, output_dir, num_images):
    """Writes ``<output_dir>/<image>.png``: ground truth (left) next to predictions (right), one
    row each for panoptic, instance and semantic segmentation."""
    os.makedirs(output_dir, exist_ok=True)
    dataset = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(dataset)
    instance_records = {
        r["image_id"]: r for r in DatasetCatalog.get(dataset.replace("panoptic", "instance"))
    }
    written = []
    for record in DatasetCatalog.get(dataset)[:num_images]:
        record = dict(record, annotations=instance_records[record["image_id"]]["annotations"])
        image = read_image(record["file_name"], format="RGB")
        prediction = predictor(image[:, :, ::-1])  # DefaultPredictor takes BGR
        rows = zip(
            draw_ground_truth(image, record, metadata), draw_prediction(image, prediction, metadata)
        )
        canvas = np.concatenate([np.concatenate(pair, axis=1) for pair in rows], axis=0)
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        path = os.path.join(output_dir, f"{stem}.png")
        Image.fromarray(np.ascontiguousarray(canvas)).save(path)
        written.append(path)
    return written


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="mask_former")
    args.max_iter = demo_max_iter(args)
    tune_malloc()
    start = time.perf_counter()
    prepare_data(args)
    output = os.path.abspath(args.output)
    train_dir = os.path.join(output, "train")
    train_seconds = None if args.skip_training else train(args, train_dir)

    losses, results = read_metrics(train_dir)
    plot_loss_curve(losses, os.path.join(output, "loss_curve.png"))
    cfg, predictor = load_predictor(args, train_dir)
    written = visualize(cfg, predictor, os.path.join(output, "vis"), args.num_vis)
    summary = {
        "config": args.config_file,
        "iterations": cfg.SOLVER.MAX_ITER,
        "train_and_eval_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "metrics": results,
        "visualizations": written,
        "loss_curve": os.path.join(output, "loss_curve.png"),
        "checkpoint": cfg.MODEL.WEIGHTS,
    }
    with open(os.path.join(output, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("Shapes val: %s", ", ".join(f"{k} {v:.1f}" for k, v in results.items()))
    logger.info(
        "Wrote %s, %s and %d visualisations in %s",
        os.path.join(output, "metrics.json"),
        summary["loss_curve"],
        len(written),
        os.path.join(output, "vis"),
    )


if __name__ == "__main__":
    main()
