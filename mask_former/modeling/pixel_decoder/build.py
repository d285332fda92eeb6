import logging

from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.utils.registry import Registry

logger = logging.getLogger(__name__)

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """
Registry for pixel decoders: modules that upsample backbone features into per-pixel embeddings.

The registered object is called with ``(cfg, input_shape)`` (``input_shape``: dict of feature name
to ``ShapeSpec``). It must provide ``forward_features(features)`` returning
``(mask_features [B, MASK_DIM, H/4, W/4], transformer_encoder_features or None,
multi_scale_features: list of [B, CONVS_DIM, h_i, w_i], lowest resolution first)``.

Pixel decoders written for the published code are registered in detectron2's
``SEM_SEG_HEADS_REGISTRY`` instead, and MaskFormer's return only the first two outputs; both are
accepted (see :func:`build_pixel_decoder` and :func:`pixel_decoder_outputs`).
"""


def build_pixel_decoder(cfg, input_shape):
    """Builds the pixel decoder named by ``cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``: from
    ``PIXEL_DECODER_REGISTRY``, else (a pixel decoder registered the published way) from
    detectron2's ``SEM_SEG_HEADS_REGISTRY``."""
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    if name not in PIXEL_DECODER_REGISTRY and name in SEM_SEG_HEADS_REGISTRY:
        logger.info(
            f"Pixel decoder {name} comes from SEM_SEG_HEADS_REGISTRY (published convention)"
        )
        decoder_class = SEM_SEG_HEADS_REGISTRY.get(name)
    else:
        decoder_class = PIXEL_DECODER_REGISTRY.get(name)
    model = decoder_class(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(
            f"Pixel decoder {name} has no forward_features(features) method; "
            "MaskFormerHead needs it."
        )
    return model


def pixel_decoder_outputs(pixel_decoder, features):
    """``pixel_decoder.forward_features(features)`` as a 3-tuple: a published MaskFormer pixel
    decoder returns only ``(mask_features, transformer_encoder_features)``; the multi-scale
    features are then None.

    Raises:
        ValueError: when it returns anything else.
    """
    outputs = pixel_decoder.forward_features(features)
    if not isinstance(outputs, (tuple, list)) or len(outputs) not in (2, 3):
        raise ValueError(
            f"{type(pixel_decoder).__name__}.forward_features must return (mask_features, "
            "transformer_encoder_features[, multi_scale_features])"
        )
    return tuple(outputs) if len(outputs) == 3 else (*outputs, None)
