#!/usr/bin/env python
"""
Converts a published Swin Transformer ImageNet checkpoint (``{"model": state_dict}``, e.g.
``swin_tiny_patch4_window7_224.pth``) to a detectron2 .pkl for the Swin configs' MODEL.WEIGHTS
(``swin_tiny_patch4_window7_224.pkl`` and so on).

    python tools/convert_swin_to_d2.py swin_tiny_patch4_window7_224.pth \
        swin_tiny_patch4_window7_224.pkl

The state_dict is kept as it is (names without ``backbone.``, the classifier ``head.*`` and the
final ``norm.*`` included) and marked for detectron2's name-matching heuristics, which map
``patch_embed.*``/``layers.*`` onto ``backbone.*`` of D2SwinTransformer; the keys nothing matches
(``head.*``, ``norm.*``, ``attn_mask`` buffers if present) are reported as unused and skipped.
"""

import argparse
import logging
import pickle

import torch

logger = logging.getLogger("mask_former.convert_swin_to_d2")

REQUIRED_KEYS = ("patch_embed.proj.weight", "layers.0.blocks.0.attn.relative_position_bias_table")


def load_swin_state_dict(path):
    """Reads the ``model`` state_dict of a Swin checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        ValueError: naming ``path``, if it is not a ``{"model": {name: tensor}}`` file or the
            state_dict lacks :data:`REQUIRED_KEYS`.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for files it refuses or cannot parse
        raise ValueError(
            f"{path} is not a tensor checkpoint readable with weights_only: {e}"
        ) from e
    state_dict = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise ValueError(f"{path} is not a Swin checkpoint {{'model': {{name: tensor}}}}")
    missing = [k for k in REQUIRED_KEYS if k not in state_dict]
    if missing:
        raise ValueError(f"{path} is not a Swin ImageNet checkpoint: its 'model' lacks {missing}")
    return state_dict


def convert(state_dict):
    """
    Args:
        state_dict (dict[str, Tensor]): the ``model`` entry of a Swin checkpoint.

    Returns:
        dict: ``{"model": {name: ndarray}, "__author__": "third_party",
        "matching_heuristics": True}``, the content of the .pkl.
    """
    model = {key: value.detach().cpu().numpy() for key, value in state_dict.items()}
    return {"model": model, "__author__": "third_party", "matching_heuristics": True}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("input", help="Swin checkpoint {'model': state_dict} (.pth)")
    parser.add_argument("output", help="detectron2 checkpoint to write (.pkl)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    converted = convert(load_swin_state_dict(args.input))
    with open(args.output, "wb") as f:
        pickle.dump(converted, f)
    logger.info("Wrote %d tensors to %s", len(converted["model"]), args.output)


if __name__ == "__main__":
    main()
