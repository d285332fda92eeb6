from .build import TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder
from .position_encoding import PositionEmbeddingSine
from .standard_decoder import StandardTransformerDecoder

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
    "PositionEmbeddingSine",
    "StandardTransformerDecoder",
]
