from detectron2.utils.registry import Registry

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Registry for transformer decoders ("predictors"): modules that turn N learnable queries into N
class predictions and mask embeddings, reading the pixel decoder's features.

The registered object is called with ``(cfg, in_channels, mask_classification)`` (see
:func:`build_transformer_decoder`) and its forward returns a dict with ``pred_logits``
[B, Q, K+1], ``pred_masks`` [B, Q, H, W] mask logits and ``aux_outputs`` (deep supervision).
"""


def build_transformer_decoder(cfg, in_channels, mask_classification=True):
    """Builds the transformer decoder named by MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)
