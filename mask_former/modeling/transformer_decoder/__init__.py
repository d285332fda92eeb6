from .build import TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder
from .mask2former_decoder import MultiScaleMaskedTransformerDecoder
from .position_encoding import PositionEmbeddingSine
from .standard_decoder import StandardTransformerDecoder

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
    "PositionEmbeddingSine",
    "StandardTransformerDecoder",
    "MultiScaleMaskedTransformerDecoder",
]
