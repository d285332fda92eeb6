from detectron2.utils.registry import Registry

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Registry for transformer decoders ("predictors"): modules that turn N learnable queries into N
class predictions and mask embeddings, reading the pixel decoder's features.

The registered object is called with ``(cfg, in_channels, mask_classification)`` (see
:func:`build_transformer_decoder`) and its forward returns a dict with ``pred_logits``
[B, Q, K+1], ``pred_masks`` [B, Q, H, W] mask logits and ``aux_outputs`` (deep supervision).
"""


def check_decoder_config(cfg):
    """
    Checks the MODEL.MASK_FORMER keys both decoders read, so that a bad value is reported by its
    key when the model is built rather than by torch in the first forward pass.

    Raises:
        ValueError: naming the key and what was expected.
    """
    mf = cfg.MODEL.MASK_FORMER
    if mf.DEC_LAYERS < 1:
        # (Mask2Former counts the prediction from the initial queries as one.)
        raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1, got {mf.DEC_LAYERS}")
    if mf.NUM_OBJECT_QUERIES < 1:
        raise ValueError(
            f"MODEL.MASK_FORMER.NUM_OBJECT_QUERIES must be >= 1, got {mf.NUM_OBJECT_QUERIES}"
        )
    if mf.NHEADS < 1 or mf.HIDDEN_DIM % mf.NHEADS:
        raise ValueError(
            f"MODEL.MASK_FORMER.HIDDEN_DIM ({mf.HIDDEN_DIM}) must be a multiple of "
            f"MODEL.MASK_FORMER.NHEADS ({mf.NHEADS})"
        )
    if mf.HIDDEN_DIM < 2 or mf.HIDDEN_DIM % 2:
        raise ValueError(
            f"MODEL.MASK_FORMER.HIDDEN_DIM must be even (the sine positional encoding gives half "
            f"of the channels to each axis), got {mf.HIDDEN_DIM}"
        )


def build_transformer_decoder(cfg, in_channels, mask_classification=True):
    """Builds the transformer decoder named by MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)
