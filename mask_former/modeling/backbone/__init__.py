"""Backbones detectron2 lacks; importing this package registers them in ``BACKBONE_REGISTRY``."""

from .swin import D2SwinTransformer

__all__ = ["D2SwinTransformer"]
