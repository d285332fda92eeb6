#!/usr/bin/env python
"""
Benchmarks a MaskFormer / Mask2Former config on random weights and random images: parameters,
FLOPs (fvcore), forward latency including post-processing (median and min after warm-up), the
time of one training step (forward, backward, and a step of the config's optimizer as
train_net.py builds it), and peak memory (process RSS on CPU; allocated memory on CUDA). Like
train_net.py it tunes glibc's allocator first (``MASK_FORMER_MALLOC_TUNING=0`` to compare without).

    python tools/benchmark_model.py --config-file configs/ade20k-150/maskformer_R50_bs16_160k.yaml \
        --size 512x512 --batch 1 --device cpu --threads 2
"""

import argparse
import logging
import resource
import statistics
import time

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances
from detectron2.utils.logger import setup_logger
from fvcore.nn import FlopCountAnalysis
from torch import nn

from mask_former import add_mask_former_config
from mask_former.engine import build_optimizer, tune_malloc

logger = logging.getLogger("mask_former.benchmark")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--size", default="512x512", help="HxW of the input images")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="timed forward passes")
    parser.add_argument(
        "--train-iters", type=int, default=3, help="timed training steps (0: no training step)"
    )
    parser.add_argument("--num-gt", type=int, default=10, help="ground-truth masks per image")
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument(
        "--amp",
        action="store_true",
        help="autocast: float16 with loss scaling on CUDA (as SOLVER.AMP.ENABLED trains), "
        "bfloat16 on the CPU (as SOLVER.AMP.CPU_BF16 trains, here also without native bfloat16)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def setup_cfg(args):
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(args.config_file, allow_unsafe=False)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.WEIGHTS = ""
    cfg.SOLVER.AMP.ENABLED = args.amp  # --amp decides, also for the optimizer build_optimizer makes
    cfg.freeze()
    return cfg


def make_inputs(cfg, height, width, batch, num_gt, seed=0):
    """Random uint8-range images with random ground-truth masks and classes."""
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(batch):
        inst = Instances((height, width))
        inst.gt_classes = torch.randint(
            0, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, (num_gt,), generator=g
        )
        inst.gt_masks = BitMasks(torch.rand((num_gt, height, width), generator=g) > 0.7)
        image = torch.randint(0, 256, (3, height, width), generator=g).float()
        inputs.append({"image": image, "height": height, "width": width, "instances": inst})
    return inputs


class TensorInTensorOut(nn.Module):
    """Wraps a detectron2 model for fvcore's tracer: images [B, 3, H, W] in, a tuple of tensors
    out (detectron2 v0.6's own wrapper in ``detectron2.utils.analysis`` needs caffe2)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        results = self.model([{"image": image} for image in images])
        tensors = []
        for r in results:
            if "sem_seg" in r:
                tensors.append(r["sem_seg"])
            if "panoptic_seg" in r:
                tensors.append(r["panoptic_seg"][0])
            if "instances" in r:
                tensors.append(r["instances"].pred_masks)
        return tuple(tensors)


def count_flops(model, inputs):
    images = torch.stack([x["image"] for x in inputs]).to(model.device)
    with torch.no_grad():
        flops = FlopCountAnalysis(TensorInTensorOut(model), (images,))
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return flops.total()


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def time_calls(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="mask_former")
    tune_malloc()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = setup_cfg(args)
    if args.device.startswith("cuda") and torch.device(args.device).index is not None:
        torch.cuda.set_device(torch.device(args.device))  # e.g. cuda:1: kernels launch there
    height, width = (int(s) for s in args.size.lower().split("x"))
    model = build_model(cfg)
    inputs = make_inputs(cfg, height, width, args.batch, args.num_gt)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"config: {args.config_file}")
    threads = torch.get_num_threads()
    print(f"device: {args.device}, threads: {threads}, input: {args.batch}x3x{height}x{width}")
    print(f"parameters: {num_params / 1e6:.3f} M")

    model.eval()
    if not args.no_flops:
        print(f"FLOPs (fvcore, per batch): {count_flops(model, inputs) / 1e9:.2f} G")

    on_cuda = args.device.startswith("cuda")
    autocast = torch.autocast(
        "cuda" if on_cuda else "cpu",
        dtype=torch.float16 if on_cuda else torch.bfloat16,
        enabled=args.amp,
    )
    if args.device.startswith("cuda"):
        # The FLOP count's trace ran in float32: measure inference alone.
        torch.cuda.reset_peak_memory_stats(torch.device(args.device))

    def forward():
        with torch.no_grad(), autocast:
            model(inputs)

    times = time_calls(forward, args.device, args.warmup, args.iters)
    print(
        f"forward incl. post-processing: median {statistics.median(times):.3f} s, "
        f"min {min(times):.3f} s ({args.batch / statistics.median(times):.2f} images/s)"
    )
    print(f"peak memory after inference: {peak_memory_mb(args.device):.0f} MB")
    if args.train_iters < 1:
        return

    model.train()
    optimizer = build_optimizer(cfg, model)  # as train_net.py: param groups, clipping, fused
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and on_cuda)

    def train_step():
        with autocast:
            losses = model(inputs)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
        # As train_net.py's step trainer: no stale gradients during the next forward pass.
        optimizer.zero_grad(set_to_none=True)

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = time_calls(train_step, args.device, 1, args.train_iters)
    print(
        f"training step (batch {args.batch}): median {statistics.median(times):.3f} s, "
        f"min {min(times):.3f} s"
    )
    print(
        f"peak memory (process {'RSS' if args.device == 'cpu' else 'CUDA allocated'}, "
        f"training included): {peak_memory_mb(args.device):.0f} MB"
    )


if __name__ == "__main__":
    main()
