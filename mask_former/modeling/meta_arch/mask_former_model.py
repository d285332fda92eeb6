"""The MaskFormer meta-architecture (also used by Mask2Former configs)."""

import contextlib
import logging
from typing import Tuple

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, ImageList
from detectron2.utils.memory import retry_if_cuda_oom
from torch import nn
from torch.nn import functional as F

from ..criterion import build_criterion
from ..postprocessing import instance_inference, panoptic_inference, semantic_inference

__all__ = ["MaskFormer", "resolve_family", "FAMILIES", "final_predictions_only"]

logger = logging.getLogger(__name__)

FAMILIES = ("MaskFormer", "Mask2Former")
# Transformer decoders whose published configs come from the Mask2Former project.
MASK2FORMER_DECODERS = ("MultiScaleMaskedTransformerDecoder",)


def resolve_family(cfg):
    """
    Which published behaviour a config follows: ``MODEL.MASK_FORMER.FAMILY`` if set, otherwise
    "Mask2Former" for a masked-attention transformer decoder and "MaskFormer" for any other.

    The family decides the criterion (focal + dice on upsampled masks vs. BCE + dice on sampled
    points, class weight 1 vs. CLASS_WEIGHT) and the panoptic pixel rule (Mask2Former also
    requires a pixel's own mask probability >= 0.5).
    """
    family = cfg.MODEL.MASK_FORMER.FAMILY
    if not family:
        decoder = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
        return "Mask2Former" if decoder in MASK2FORMER_DECODERS else "MaskFormer"
    if family not in FAMILIES:
        raise ValueError(
            f"MODEL.MASK_FORMER.FAMILY must be one of {FAMILIES} or '', got {family!r}"
        )
    return family


@contextlib.contextmanager
def final_predictions_only(head):
    """Lets the transformer decoder of ``head`` skip its intermediate predictions (``aux_outputs``)
    inside the context: inference reads only the last prediction. Called directly, the heads
    return them in eval mode too, as the published ones do; the final outputs are the same either
    way. Heads whose predictor has no ``aux_outputs_in_eval`` switch are left alone."""
    predictor = getattr(head, "predictor", None)
    if not hasattr(predictor, "aux_outputs_in_eval"):
        yield
        return
    previous = predictor.aux_outputs_in_eval
    predictor.aux_outputs_in_eval = False
    try:
        yield
    finally:
        predictor.aux_outputs_in_eval = previous


def resize_to_output(maps, image_size, height, width):
    """
    detectron2's ``sem_seg_postprocess``: crops [C, H_pad, W_pad] maps to ``image_size`` and
    resizes them bilinearly to (height, width); the resize is skipped when the sizes already
    agree (bilinear resizing to the same size is the identity).
    """
    maps = maps[:, : image_size[0], : image_size[1]]
    if tuple(maps.shape[-2:]) == (height, width):
        return maps
    return sem_seg_postprocess(maps, image_size, height, width)


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    """
    Mask classification for semantic, panoptic and instance segmentation: a backbone, a
    :class:`MaskFormerHead` (pixel decoder + transformer decoder) and a set criterion.

    Input: a list of dicts in detectron2's format, each with ``image`` ([C, H, W] uint8 or float,
    in ``INPUT.FORMAT``), optional ``height``/``width`` (output size) and, in training,
    ``instances`` with ``gt_classes`` [n] and ``gt_masks`` [n, H, W].

    Output in inference, per image: ``sem_seg`` [K, height, width] (SEMANTIC_ON),
    ``panoptic_seg`` = (int32 [height, width] map, segments_info) (PANOPTIC_ON) and ``instances``
    (INSTANCE_ON) with ``pred_masks``, ``scores``, ``pred_classes`` and ``pred_boxes``.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        sem_seg_head: nn.Module,
        criterion: nn.Module,
        num_queries: int,
        object_mask_threshold: float,
        overlap_threshold: float,
        metadata,
        size_divisibility: int,
        sem_seg_postprocess_before_inference: bool,
        pixel_mean: Tuple[float],
        pixel_std: Tuple[float],
        semantic_on: bool = True,
        panoptic_on: bool = False,
        instance_on: bool = False,
        test_topk_per_image: int = 100,
        panoptic_mask_threshold_pixels: bool = False,
        channels_last: bool = False,
    ):
        """
        Args:
            backbone (Backbone): a detectron2 backbone.
            sem_seg_head (nn.Module): gives ``pred_logits`` [B, Q, K+1] and ``pred_masks``
                [B, Q, h, w] from the backbone features.
            criterion (nn.Module): the set criterion; its ``weight_dict`` weighs the losses.
            num_queries (int): Q.
            object_mask_threshold (float): panoptic: minimum class score of a kept query.
            overlap_threshold (float): panoptic: minimum kept fraction of a segment's mask.
            metadata: dataset metadata (``thing_dataset_id_to_contiguous_id`` for panoptic and
                instance outputs).
            size_divisibility (int): pad images to a multiple of this; negative: the backbone's.
            sem_seg_postprocess_before_inference (bool): resize mask logits to the output size
                before inference (forced on by panoptic and instance outputs).
            pixel_mean, pixel_std: normalisation, per channel.
            semantic_on, panoptic_on, instance_on (bool): which outputs to return.
            test_topk_per_image (int): instance outputs per image.
            panoptic_mask_threshold_pixels (bool): Mask2Former's panoptic rule (a pixel joins a
                segment only where that segment's probability is >= 0.5).
            channels_last (bool): keep convolution weights and the image batch in the
                channels-last memory layout (same results up to float rounding; faster for
                MaskFormer on CPU).
        """
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_queries = num_queries
        self.overlap_threshold = overlap_threshold
        self.object_mask_threshold = object_mask_threshold
        self.metadata = metadata
        if size_divisibility < 0:
            size_divisibility = self.backbone.size_divisibility
        self.size_divisibility = size_divisibility
        self.sem_seg_postprocess_before_inference = (
            sem_seg_postprocess_before_inference or panoptic_on or instance_on
        )
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.semantic_on = semantic_on
        self.panoptic_on = panoptic_on
        self.instance_on = instance_on
        if instance_on and test_topk_per_image < 0:
            raise ValueError(
                f"TEST.DETECTIONS_PER_IMAGE must be >= 0 for instance outputs, got "
                f"{test_topk_per_image}"
            )
        self.test_topk_per_image = test_topk_per_image
        self.panoptic_mask_threshold_pixels = panoptic_mask_threshold_pixels
        if (panoptic_on or instance_on) and self._thing_mapping() is None:
            logger.warning(
                f"Metadata of {getattr(metadata, 'name', '?')!r} has no "
                "thing_dataset_id_to_contiguous_id (yet): until it has, panoptic/instance outputs "
                "treat every class as stuff."
            )
        self.channels_last = channels_last
        if channels_last:
            # Converts every 4-D parameter and buffer; checkpoints load into it unchanged
            # (load_state_dict copies values, keeping this layout).
            self.to(memory_format=torch.channels_last)

    def _thing_mapping(self):
        return getattr(self.metadata, "thing_dataset_id_to_contiguous_id", None)

    @property
    def thing_ids(self) -> frozenset:
        """Contiguous ids of the thing classes, read from the metadata at every call (as
        published), so metadata completed after the model was built is used."""
        mapping = self._thing_mapping()
        return frozenset() if mapping is None else frozenset(mapping.values())

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        family = resolve_family(cfg)
        test = cfg.MODEL.MASK_FORMER.TEST
        metadata = MetadataCatalog.get(cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else "__empty")
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": build_criterion(cfg, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, family),
            "num_queries": cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES,
            "object_mask_threshold": test.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": test.OVERLAP_THRESHOLD,
            "metadata": metadata,
            "size_divisibility": cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": test.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "semantic_on": test.SEMANTIC_ON,
            "panoptic_on": test.PANOPTIC_ON,
            "instance_on": test.INSTANCE_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "panoptic_mask_threshold_pixels": family == "Mask2Former",
            "channels_last": cfg.MODEL.MASK_FORMER.CHANNELS_LAST,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    @property
    def num_classes(self):
        return self.sem_seg_head.num_classes

    def forward(self, batched_inputs):
        """
        Args:
            batched_inputs (list[dict]): see the class docstring.

        Returns:
            dict[str, Tensor]: weighted losses in training; list[dict] of results in inference.
        """
        if self.training and "instances" not in batched_inputs[0]:
            raise ValueError(
                "MaskFormer training needs 'instances' (gt_classes, gt_masks) in "
                "every input dict; check the dataset mapper"
            )
        images = self.preprocess_image(batched_inputs)
        x = images.tensor
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        if not self.training:
            with final_predictions_only(self.sem_seg_head):
                outputs = self.sem_seg_head(features)
            return self.inference(outputs, batched_inputs, images)
        outputs = self.sem_seg_head(features)
        targets = self.prepare_targets(batched_inputs, images)
        losses = self.criterion(outputs, targets)
        weights = self.criterion.weight_dict
        return {k: v * weights[k] for k, v in losses.items() if k in weights}

    def preprocess_image(self, batched_inputs):
        """Normalises the images and pads them into an :class:`ImageList`."""
        channels = self.pixel_mean.shape[0]
        images = []
        for i, x in enumerate(batched_inputs):
            image = x["image"]
            if image.dim() != 3 or image.shape[0] != channels or min(image.shape[1:]) == 0:
                raise ValueError(
                    f"Input {i}: 'image' must be a non-empty [C, H, W] tensor with C={channels} "
                    f"(MODEL.PIXEL_MEAN has {channels} values); got shape {tuple(image.shape)}"
                )
            images.append((image.to(self.device) - self.pixel_mean) / self.pixel_std)
        return ImageList.from_tensors(images, self.size_divisibility)

    def prepare_targets(self, batched_inputs, images):
        """Pads every image's ground-truth masks to the padded batch size."""
        height, width = images.tensor.shape[-2:]
        targets = []
        for x in batched_inputs:
            gt = x["instances"].to(self.device)
            masks = gt.gt_masks.tensor if isinstance(gt.gt_masks, BitMasks) else gt.gt_masks
            padded = masks.new_zeros((masks.shape[0], height, width))
            padded[:, : masks.shape[1], : masks.shape[2]] = masks
            targets.append({"labels": gt.gt_classes, "masks": padded})
        return targets

    def inference(self, outputs, batched_inputs, images):
        """Turns the head's outputs into per-image results at each input's output size."""
        mask_pred_results = F.interpolate(
            outputs["pred_masks"],
            size=images.tensor.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        results = []
        for mask_cls, mask_pred, inputs, image_size in zip(
            outputs["pred_logits"], mask_pred_results, batched_inputs, images.image_sizes
        ):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            results.append(self.inference_single(mask_cls, mask_pred, image_size, height, width))
        return results

    def inference_single(self, mask_cls, mask_pred, image_size, height, width):
        """
        Args:
            mask_cls (Tensor): [Q, K+1] class logits.
            mask_pred (Tensor): [Q, H_pad, W_pad] mask logits at the padded input size.
            image_size (tuple): (h, w) of the image inside the padding.
            height, width (int): output size.

        Returns:
            dict: ``sem_seg``, ``panoptic_seg``, ``instances`` as enabled.
        """
        # As published, each step that holds [Q, H, W] maps at the output size retries on the
        # CPU when CUDA runs out of memory (large outputs, e.g. Mapillary at full resolution).
        result = {}
        if self.sem_seg_postprocess_before_inference:
            mask_pred = retry_if_cuda_oom(resize_to_output)(mask_pred, image_size, height, width)
        else:
            # Semantic inference is per pixel: crop the padding off before it, not after.
            mask_pred = mask_pred[:, : image_size[0], : image_size[1]]
        mask_cls = mask_cls.to(mask_pred)
        if self.semantic_on:
            sem_seg = retry_if_cuda_oom(semantic_inference)(mask_cls, mask_pred)
            if not self.sem_seg_postprocess_before_inference:
                sem_seg = retry_if_cuda_oom(resize_to_output)(sem_seg, image_size, height, width)
            result["sem_seg"] = sem_seg
        if self.panoptic_on:
            result["panoptic_seg"] = retry_if_cuda_oom(panoptic_inference)(
                mask_cls,
                mask_pred,
                num_classes=self.num_classes,
                thing_ids=self.thing_ids,
                object_mask_threshold=self.object_mask_threshold,
                overlap_threshold=self.overlap_threshold,
                mask_threshold_pixels=self.panoptic_mask_threshold_pixels,
            )
        if self.instance_on:
            result["instances"] = retry_if_cuda_oom(instance_inference)(
                mask_cls,
                mask_pred,
                num_classes=self.num_classes,
                topk=self.test_topk_per_image,
                thing_ids=self.thing_ids if self.panoptic_on else None,
            )
        return result
