"""The MaskFormer paper's per-pixel classification baselines (used with detectron2's
``SemanticSegmentor`` meta-architecture)."""

from typing import Dict

import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from fvcore.nn import weight_init
from torch import nn

from ..pixel_decoder import pixel_decoder_outputs
from ..transformer_decoder import build_transformer_decoder
from .mask_former_head import (
    PixelDecoderLayoutMixin,
    check_transformer_in_feature,
    common_head_config,
    run_pixel_decoder,
    transformer_input_channels,
)

__all__ = ["PerPixelBaselineHead", "PerPixelBaselinePlusHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class PerPixelBaselineHead(PixelDecoderLayoutMixin, nn.Module):
    """Per-pixel classification: a pixel decoder, then a 1x1 conv to K class logits per pixel,
    trained with cross-entropy."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        pixel_decoder: nn.Module,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
    ):
        """
        Args:
            input_shape: shapes of the backbone features the head reads.
            num_classes (int): K.
            pixel_decoder (nn.Module): see ``PIXEL_DECODER_REGISTRY``.
            loss_weight (float): weight of ``loss_sem_seg``.
            ignore_value (int): label ignored by the loss.
        """
        super().__init__()
        input_shape = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [name for name, _ in input_shape]
        self.ignore_value = ignore_value
        self.common_stride = 4
        self.loss_weight = loss_weight
        self.pixel_decoder = pixel_decoder
        self.predictor = Conv2d(pixel_decoder.mask_dim, num_classes, kernel_size=1)
        weight_init.c2_msra_fill(self.predictor)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        return common_head_config(cfg, input_shape)

    def forward(self, features, targets=None):
        """
        Args:
            features (dict[str, Tensor]): backbone features.
            targets (Tensor or None): [B, H, W] int64 labels (training).

        Returns:
            In training ``(None, {"loss_sem_seg": ...})``; in inference ``([B, K, H, W] logits
            at input resolution, {})``, as detectron2's ``SemanticSegmentor`` expects.
        """
        logits = self.layers(features)
        if self.training:
            return None, self.losses(logits, targets)
        return self._upsample(logits), {}

    def layers(self, features):
        mask_features, _, _ = pixel_decoder_outputs(self.pixel_decoder, features)
        return self.predictor(mask_features)

    def _upsample(self, logits):
        return F.interpolate(
            logits, scale_factor=self.common_stride, mode="bilinear", align_corners=False
        )

    def losses(self, predictions, targets):
        """Cross-entropy of the upsampled logits [B, K, H, W] against targets [B, H, W]."""
        predictions = self._upsample(predictions.float())
        loss = F.cross_entropy(
            predictions, targets, reduction="mean", ignore_index=self.ignore_value
        )
        return {"loss_sem_seg": loss * self.loss_weight}


@SEM_SEG_HEADS_REGISTRY.register()
class PerPixelBaselinePlusHead(PerPixelBaselineHead):
    """
    Per-pixel baseline "plus": the MaskFormer transformer decoder without class prediction, one
    query per class (NUM_OBJECT_QUERIES = K); query k's mask logits are class k's per-pixel
    logits. With deep supervision every decoder layer gets the cross-entropy loss (suffix ``_i``).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_in_feature: str,
        transformer_predictor: nn.Module,
        deep_supervision: bool,
        num_classes: int,
        pixel_decoder: nn.Module,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
    ):
        """
        Args:
            transformer_in_feature (str): what the predictor reads (see MaskFormerHead).
            transformer_predictor (nn.Module): built with ``mask_classification=False``.
            deep_supervision (bool): add a loss for every intermediate decoder layer.
            Others as :class:`PerPixelBaselineHead`.
        """
        super().__init__(
            input_shape,
            num_classes=num_classes,
            pixel_decoder=pixel_decoder,
            loss_weight=loss_weight,
            ignore_value=ignore_value,
        )
        del self.predictor
        self.predictor = transformer_predictor
        self.transformer_in_feature = transformer_in_feature
        self.deep_supervision = deep_supervision

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        queries, classes = (
            cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES,
            cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        )
        if queries != classes:
            raise ValueError(
                f"{cls.__name__} predicts one query per class: MODEL.MASK_FORMER."
                f"NUM_OBJECT_QUERIES ({queries}) must equal MODEL.SEM_SEG_HEAD.NUM_CLASSES "
                f"({classes})"
            )
        ret = super().from_config(cfg, input_shape)
        ret["transformer_in_feature"] = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
        ret["transformer_predictor"] = build_transformer_decoder(
            cfg, transformer_input_channels(cfg, ret["input_shape"]), mask_classification=False
        )
        check_transformer_in_feature(ret["transformer_predictor"], ret["transformer_in_feature"])
        ret["deep_supervision"] = cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION
        return ret

    def forward(self, features, targets=None):
        logits, aux_outputs = self.layers(features)
        if not self.training:
            return self._upsample(logits), {}
        losses = self.losses(logits, targets)
        if self.deep_supervision:
            for i, aux in enumerate(aux_outputs):
                losses[f"loss_sem_seg_{i}"] = self.losses(aux["pred_masks"], targets)[
                    "loss_sem_seg"
                ]
        return None, losses

    def layers(self, features):
        mask_features, x = run_pixel_decoder(
            self.pixel_decoder, features, self.transformer_in_feature
        )
        predictions = self.predictor(x, mask_features)
        return predictions["pred_masks"], predictions.get("aux_outputs", [])
