from detectron2.utils.registry import Registry

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """
Registry for pixel decoders: modules that upsample backbone features into per-pixel embeddings.

The registered object is called with ``(cfg, input_shape)`` (``input_shape``: dict of feature name
to ``ShapeSpec``). It must provide ``forward_features(features)`` returning
``(mask_features [B, MASK_DIM, H/4, W/4], transformer_encoder_features or None,
multi_scale_features: list of [B, CONVS_DIM, h_i, w_i], lowest resolution first)``.
"""


def build_pixel_decoder(cfg, input_shape):
    """Builds the pixel decoder named by ``cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``."""
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    model = PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(
            f"Pixel decoder {name} has no forward_features(features) method; "
            "MaskFormerHead needs it."
        )
    return model
