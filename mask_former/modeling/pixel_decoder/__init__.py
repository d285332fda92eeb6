from .build import PIXEL_DECODER_REGISTRY, build_pixel_decoder, pixel_decoder_outputs
from .fpn import BasePixelDecoder, TransformerEncoderPixelDecoder
from .msdeformattn import MSDeformAttnPixelDecoder

__all__ = [
    "PIXEL_DECODER_REGISTRY",
    "build_pixel_decoder",
    "pixel_decoder_outputs",
    "BasePixelDecoder",
    "TransformerEncoderPixelDecoder",
    "MSDeformAttnPixelDecoder",
]
