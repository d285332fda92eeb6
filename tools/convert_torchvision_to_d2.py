#!/usr/bin/env python
"""
Converts a torchvision ImageNet ResNet state_dict (.pth) to a detectron2 .pkl for the ResNet
configs' MODEL.WEIGHTS (``R-50.pkl`` from ResNet-50, ``R-101.pkl`` from ResNet-101).

    python tools/convert_torchvision_to_d2.py resnet50.pth R-50.pkl

One way to get the input (downloads torchvision's ImageNet weights once):

    python -c "import torch, torchvision; torch.save(torchvision.models.resnet50(\
weights='IMAGENET1K_V1').state_dict(), 'resnet50.pth')"

Names follow detectron2's ResNet: ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``,
``layer{i}.{j}.conv{k}``/``bn{k}`` -> ``res{i+1}.{j}.conv{k}``/``conv{k}.norm``,
``downsample.0``/``.1`` -> ``shortcut``/``shortcut.norm``; the classifier ``fc`` and the BatchNorm
counters ``num_batches_tracked`` are dropped. The weights suit configs with
``MODEL.RESNETS.STRIDE_IN_1X1: False`` (torchvision strides in the 3x3 conv), RGB input and
torchvision's ImageNet mean/std, as the published ResNet configs set.
"""

import argparse
import logging
import pickle
import re

import torch

logger = logging.getLogger("mask_former.convert_torchvision_to_d2")

# torchvision layer name (inside the stem or a block) -> detectron2 name.
LAYER_NAMES = {
    "conv1": "conv1",
    "bn1": "conv1.norm",
    "conv2": "conv2",
    "bn2": "conv2.norm",
    "conv3": "conv3",
    "bn3": "conv3.norm",
    "downsample.0": "shortcut",
    "downsample.1": "shortcut.norm",
}
# [layer{stage}.{block}.]{layer}.{param}; without the block prefix, a layer of the stem.
KEY_PATTERN = re.compile(r"^(?:layer(\d+)\.(\d+)\.)?(conv\d|bn\d|downsample\.[01])\.(\w+)$")
# Keys with no detectron2 counterpart: the ImageNet classifier and BatchNorm's step counters.
DROPPED = re.compile(r"^fc\.|\.num_batches_tracked$")
REQUIRED_KEYS = ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight")


def load_state_dict(path):
    """Reads a plain ``{name: tensor}`` checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        ValueError: naming ``path``, if it is not such a file or lacks :data:`REQUIRED_KEYS`.
    """
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for files it refuses or cannot parse
        raise ValueError(
            f"{path} is not a tensor checkpoint readable with weights_only: {e}"
        ) from e
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise ValueError(f"{path} is not a plain state_dict (a dict of name -> tensor)")
    missing = [k for k in REQUIRED_KEYS if k not in state_dict]
    if missing:
        raise ValueError(f"{path} is not a torchvision ResNet state_dict: it lacks {missing}")
    return state_dict


def convert_key(key):
    """The detectron2 name of a torchvision ResNet key, or None for a dropped key."""
    if DROPPED.search(key):
        return None
    match = KEY_PATTERN.match(key)
    if match is None:
        raise ValueError(f"unexpected key in a torchvision ResNet: {key}")
    stage, block, layer, param = match.groups()
    prefix = "stem." if stage is None else f"res{int(stage) + 1}.{block}."
    return f"{prefix}{LAYER_NAMES[layer]}.{param}"


def convert(state_dict):
    """
    Args:
        state_dict (dict[str, Tensor]): a torchvision ResNet's state_dict.

    Returns:
        dict: ``{"model": {detectron2 name: ndarray}, "__author__": "torchvision",
        "matching_heuristics": True}``, the content of the .pkl.
    """
    model = {}
    for key, value in state_dict.items():
        new_key = convert_key(key)
        if new_key is not None:
            model[new_key] = value.detach().cpu().numpy()
    return {"model": model, "__author__": "torchvision", "matching_heuristics": True}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("input", help="torchvision ResNet state_dict (.pth)")
    parser.add_argument("output", help="detectron2 checkpoint to write (.pkl)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    converted = convert(load_state_dict(args.input))
    with open(args.output, "wb") as f:
        pickle.dump(converted, f)
    logger.info("Wrote %d tensors to %s", len(converted["model"]), args.output)


if __name__ == "__main__":
    main()
