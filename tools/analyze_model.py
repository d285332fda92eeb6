#!/usr/bin/env python
"""
Counts the parameters, FLOPs and activations of a MaskFormer / Mask2Former config, per module
(fvcore), or prints its structure.

    python tools/analyze_model.py --config-file configs/ade20k-150/maskformer_R50_bs16_160k.yaml \
        --tasks parameter flop activation [--num-inputs 3] [-- KEY VALUE ...]

FLOPs and activations are measured on inference (post-processing included) of
``--num-inputs`` images, one at a time: the first images of ``DATASETS.TEST[0]`` when that
dataset is registered and readable, else random images of ``--input-size`` (default: 4:3 with
the short side ``INPUT.MIN_SIZE_TEST``). Images are resized as evaluation resizes them. fvcore
counts one FLOP per fused multiply-add and skips element-wise operations. Weights are random:
they change none of these counts.
"""

import argparse
import logging
import os
import statistics

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from fvcore.nn import (
    ActivationCountAnalysis,
    FlopCountAnalysis,
    flop_count_table,
    parameter_count_table,
)
from torch import nn

from mask_former import add_mask_former_config
from mask_former.engine import BatchPredictor, use_cpu_without_cuda

logger = logging.getLogger("mask_former.analyze_model")

TASKS = ("parameter", "flop", "activation", "structure")
DEFAULT_ASPECT_RATIO = 4 / 3  # width / height of the random images


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.strip().split("\n\n", 1)[1],
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["parameter", "flop"])
    parser.add_argument("--num-inputs", type=int, default=1, help="images to average over")
    parser.add_argument(
        "--random-input", action="store_true", help="random images even if the dataset exists"
    )
    parser.add_argument("--input-size", metavar="HxW", help="size of the random images")
    parser.add_argument("--max-depth", type=int, default=3, help="module depth of the tables")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides KEY VALUE ... (after '--' when they follow --tasks)",
    )
    args = parser.parse_args(argv)
    if args.opts[:1] == ["--"]:
        args.opts = args.opts[1:]
    if not os.path.isfile(args.config_file):
        parser.error(f"--config-file {args.config_file} does not exist")
    if args.num_inputs < 1:
        parser.error(f"--num-inputs must be >= 1, got {args.num_inputs}")
    if args.input_size is not None:
        try:
            args.input_size = tuple(int(s) for s in args.input_size.lower().split("x"))
        except ValueError:
            args.input_size = ()
        if len(args.input_size) != 2 or min(args.input_size) < 1:
            parser.error("--input-size must look like 512x683 (height x width)")
    return args


def setup_cfg(args):
    """The frozen config, with random weights and on the CPU when CUDA is missing."""
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(args.config_file, allow_unsafe=False)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.WEIGHTS = ""
    use_cpu_without_cuda(cfg)
    cfg.freeze()
    return cfg


def dataset_images(cfg, num_inputs):
    """The first ``num_inputs`` images of ``DATASETS.TEST[0]`` in ``INPUT.FORMAT``, or None
    (logged) when there is no such dataset or its files cannot be read."""
    if not cfg.DATASETS.TEST:
        return None
    name = cfg.DATASETS.TEST[0]
    try:
        records = DatasetCatalog.get(name)[:num_inputs]
        return [read_image(r["file_name"], format=cfg.INPUT.FORMAT) for r in records] or None
    except (KeyError, OSError, ValueError) as e:
        logger.info("Dataset %r is not available (%s: %s)", name, type(e).__name__, e)
        return None


def random_images(cfg, num_inputs, size=None, seed=0):
    """``num_inputs`` random uint8 images of ``size`` (H, W); default: 4:3 with the short side
    ``INPUT.MIN_SIZE_TEST`` (the size evaluation resizes to)."""
    if size is None:
        short = cfg.INPUT.MIN_SIZE_TEST
        size = (short, round(short * DEFAULT_ASPECT_RATIO))
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(num_inputs)]


class TensorOutputs(nn.Module):
    """
    The model on one image as fvcore's tracer needs it: an image tensor in, a tuple of tensors
    out (detectron2 v0.6's ``detectron2.utils.analysis`` cannot be imported without caffe2).
    ``height`` and ``width`` of the input dict are kept as constants, so the resize to the output
    size is counted too.
    """

    def __init__(self, model, inputs):
        """
        Args:
            model (nn.Module): the detectron2 model.
            inputs (dict): the model's input dict of the image (``image`` is replaced).
        """
        super().__init__()
        self.model = model
        self.extra = {k: v for k, v in inputs.items() if k != "image"}

    def forward(self, image):
        (result,) = self.model([dict(self.extra, image=image)])
        tensors = []
        if "sem_seg" in result:
            tensors.append(result["sem_seg"])
        if "panoptic_seg" in result:
            tensors.append(result["panoptic_seg"][0])
        if "instances" in result:
            instances = result["instances"]
            tensors += [instances.pred_masks, instances.scores, instances.pred_classes]
        return tuple(tensors)


def analyze(analysis_type, model, inputs):
    """Runs one fvcore analysis per input and returns them."""
    analyses = []
    for x in inputs:
        analysis = analysis_type(TensorOutputs(model, x), (x["image"].to(model.device),))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        with torch.no_grad():
            analysis.total()
        analyses.append(analysis)
    return analyses


def _human(count):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.3f} {unit}"
    return f"{count:.0f}"


def _summary(name, totals):
    mean = statistics.mean(totals)
    spread = f" ± {_human(statistics.stdev(totals))}" if len(totals) > 1 else ""
    return f"Total {name} per image: {_human(mean)}{spread} (over {len(totals)} input(s))"


def analysis_inputs(cfg, predictor, args):
    """The model input dicts to analyse (dataset images if available, else random ones)."""
    images = None if args.random_input else dataset_images(cfg, args.num_inputs)
    source = f"dataset {cfg.DATASETS.TEST[0]}" if images else "random images"
    if images is None:
        images = random_images(cfg, args.num_inputs, args.input_size)
    inputs = [predictor.to_model_input(image) for image in images]
    sizes = ", ".join(str(tuple(x["image"].shape[1:])) for x in inputs)
    print(f"Inputs: {len(inputs)} image(s) from {source}; model input sizes (H, W): {sizes}")
    return inputs


def report_counts(model, inputs, tasks, max_depth):
    """Prints the FLOP and/or activation tables (of the first input) and totals; returns the
    per-input totals under ``flops`` / ``activations``."""
    flops = analyze(FlopCountAnalysis, model, inputs) if "flop" in tasks else None
    activations = analyze(ActivationCountAnalysis, model, inputs) if "activation" in tasks else None
    if flops:
        skipped = sorted(flops[0].unsupported_ops())
        logger.info("Operators whose FLOPs are not counted: %s", ", ".join(skipped) or "none")
        table = flop_count_table(
            flops[0], max_depth=max_depth, activations=activations[0] if activations else None
        )
    else:
        # fvcore's table takes any analysis; only its column header names FLOPs.
        table = flop_count_table(activations[0], max_depth=max_depth)
        table = table.replace("#flops", "#activations")
    print(f"Per module (first input):\n{table}")
    results = {}
    for key, name, analyses in (
        ("flops", "FLOPs", flops),
        ("activations", "activations", activations),
    ):
        if analyses:
            results[key] = [a.total() for a in analyses]
            print(_summary(name, results[key]))
    return results


def main(argv=None):
    """Prints the requested reports; returns the numbers: ``parameters`` (int), ``flops`` and
    ``activations`` (list[int], one per input)."""
    args = parse_args(argv)
    setup_logger(name="mask_former")
    cfg = setup_cfg(args)
    predictor = BatchPredictor(cfg, input_format=cfg.INPUT.FORMAT)
    model = predictor.model
    results = {}
    if "structure" in args.tasks:
        print(f"Model structure:\n{model}")
    if "parameter" in args.tasks:
        results["parameters"] = sum(p.numel() for p in model.parameters())
        print(f"Parameters per module:\n{parameter_count_table(model, max_depth=args.max_depth)}")
        print(f"Total parameters: {results['parameters']} ({results['parameters'] / 1e6:.3f} M)")
    if {"flop", "activation"} & set(args.tasks):
        inputs = analysis_inputs(cfg, predictor, args)
        results.update(report_counts(model, inputs, args.tasks, args.max_depth))
    return results


if __name__ == "__main__":
    main()
