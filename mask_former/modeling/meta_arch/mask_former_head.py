"""MaskFormerHead: pixel decoder + transformer decoder, registered as a detectron2 sem-seg head."""

import logging
from typing import Dict

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ..pixel_decoder import build_pixel_decoder, pixel_decoder_outputs
from ..transformer_decoder import build_transformer_decoder

__all__ = [
    "MaskFormerHead",
    "TRANSFORMER_IN_FEATURES",
    "move_pixel_decoder_keys",
    "run_pixel_decoder",
    "transformer_input_channels",
]

logger = logging.getLogger(__name__)

# The published TRANSFORMER_IN_FEATURE choices that name a pixel-decoder output rather than a
# backbone feature: which output the transformer decoder reads, and the SEM_SEG_HEAD key giving its
# width. Any other value names a backbone feature.
TRANSFORMER_IN_FEATURES = {
    "transformer_encoder": ("transformer_encoder_features", "CONVS_DIM"),
    "pixel_embedding": ("mask_features", "MASK_DIM"),
    "multi_scale_pixel_decoder": ("multi_scale_features", "CONVS_DIM"),
}


def transformer_input_channels(cfg, input_shape):
    """Width of what the transformer decoder reads (MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE)."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
    if name in TRANSFORMER_IN_FEATURES:
        return cfg.MODEL.SEM_SEG_HEAD[TRANSFORMER_IN_FEATURES[name][1]]
    if name not in input_shape:
        raise ValueError(
            f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE={name!r} is neither one of "
            f"{sorted(TRANSFORMER_IN_FEATURES)} nor a backbone feature ({sorted(input_shape)})"
        )
    return input_shape[name].channels


def check_transformer_in_feature(predictor, name):
    """
    Raises ValueError when MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE does not give ``predictor``
    what it reads: the multi-scale levels, or one map. Only decoder classes that declare
    ``reads_multi_scale_features`` themselves are checked (the two built-in ones): a user's
    subclass may read other inputs than its base.
    """
    multi_scale = vars(type(predictor)).get("reads_multi_scale_features")
    if multi_scale is None or multi_scale == (name == "multi_scale_pixel_decoder"):
        return
    decoder = type(predictor).__name__
    if multi_scale:
        expected = "'multi_scale_pixel_decoder'"
    else:
        expected = "one map: a backbone feature, 'transformer_encoder' or 'pixel_embedding'"
    raise ValueError(
        f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE={name!r} does not suit {decoder} "
        f"(MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME), which reads {expected}"
    )


def run_pixel_decoder(pixel_decoder, features, transformer_in_feature):
    """
    Runs the pixel decoder and picks the transformer decoder's input.

    Returns:
        mask_features (Tensor): [B, MASK_DIM, H/4, W/4].
        transformer_input (Tensor or list[Tensor]): what the transformer decoder reads.
    """
    mask_features, encoder_features, multi_scale_features = pixel_decoder_outputs(
        pixel_decoder, features
    )
    if transformer_in_feature not in TRANSFORMER_IN_FEATURES:
        return mask_features, features[transformer_in_feature]
    outputs = {
        "mask_features": mask_features,
        "transformer_encoder_features": encoder_features,
        "multi_scale_features": multi_scale_features,
    }
    selected = outputs[TRANSFORMER_IN_FEATURES[transformer_in_feature][0]]
    if selected is None:
        raise ValueError(
            f"TRANSFORMER_IN_FEATURE={transformer_in_feature!r} needs a pixel decoder that "
            f"provides it; {type(pixel_decoder).__name__} returned None"
        )
    return mask_features, selected


def move_pixel_decoder_keys(state_dict, prefix, owner):
    """
    Moves pixel-decoder weights stored directly under ``prefix`` (older published checkpoints,
    e.g. ``sem_seg_head.adapter_1.weight``) to ``prefix + "pixel_decoder."``, in place. Keys
    already under ``pixel_decoder.`` or ``predictor.`` are left alone, so both layouts load.
    """
    moved = 0
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if rest.startswith(("pixel_decoder.", "predictor.")):
            continue
        new_key = prefix + "pixel_decoder." + rest
        if new_key in state_dict:
            logger.warning(f"{owner}: checkpoint has both {key} and {new_key}; keeping {new_key}")
            continue
        state_dict[new_key] = state_dict.pop(key)
        moved += 1
    if moved:
        logger.info(
            f"{owner}: read {moved} pixel-decoder weights stored under '{prefix}' "
            f"as '{prefix}pixel_decoder.*' (older checkpoint layout)"
        )


def common_head_config(cfg, input_shape):
    """The ``from_config`` arguments every head of this package shares: the backbone features it
    reads, its pixel decoder, classes, ignore value and loss weight."""
    head = cfg.MODEL.SEM_SEG_HEAD
    input_shape = {k: v for k, v in input_shape.items() if k in head.IN_FEATURES}
    return {
        "input_shape": input_shape,
        "ignore_value": head.IGNORE_VALUE,
        "num_classes": head.NUM_CLASSES,
        "pixel_decoder": build_pixel_decoder(cfg, input_shape),
        "loss_weight": head.LOSS_WEIGHT,
    }


class PixelDecoderLayoutMixin:
    """Lets a head load checkpoints in both pixel-decoder layouts (see move_pixel_decoder_keys).

    The heads' module version is 2, as published: the published heads move every key but
    ``predictor.*`` under ``pixel_decoder.`` when a checkpoint records an older version, so our
    checkpoints must record 2 to load unchanged there.
    """

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        move_pixel_decoder_keys(state_dict, prefix, type(self).__name__)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(PixelDecoderLayoutMixin, nn.Module):
    """
    The MaskFormer / Mask2Former head: a pixel decoder giving per-pixel embeddings, and a
    transformer decoder (``predictor``) giving per-query class logits and mask logits.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        pixel_decoder: nn.Module,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
        transformer_predictor: nn.Module,
        transformer_in_feature: str,
    ):
        """
        Args:
            input_shape: shapes of the backbone features the head reads.
            num_classes (int): K.
            pixel_decoder (nn.Module): see ``PIXEL_DECODER_REGISTRY``.
            loss_weight (float), ignore_value (int): kept for the published interface (the
                losses are computed by the meta-architecture's criterion).
            transformer_predictor (nn.Module): see ``TRANSFORMER_DECODER_REGISTRY``.
            transformer_in_feature (str): what the predictor reads, see TRANSFORMER_IN_FEATURES.
        """
        super().__init__()
        input_shape = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [name for name, _ in input_shape]
        self.ignore_value = ignore_value
        self.common_stride = 4
        self.loss_weight = loss_weight
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.transformer_in_feature = transformer_in_feature
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = common_head_config(cfg, input_shape)
        name = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
        ret["transformer_in_feature"] = name
        ret["transformer_predictor"] = build_transformer_decoder(
            cfg, transformer_input_channels(cfg, ret["input_shape"]), mask_classification=True
        )
        check_transformer_in_feature(ret["transformer_predictor"], name)
        return ret

    def forward(self, features, mask=None):
        """
        Args:
            features (dict[str, Tensor]): backbone features.
            mask (Tensor or None): passed to the predictor.

        Returns:
            dict: the predictor's outputs (``pred_logits``, ``pred_masks``, ``aux_outputs``).
        """
        return self.layers(features, mask)

    def layers(self, features, mask=None):
        mask_features, predictor_input = run_pixel_decoder(
            self.pixel_decoder, features, self.transformer_in_feature
        )
        return self.predictor(predictor_input, mask_features, mask)
