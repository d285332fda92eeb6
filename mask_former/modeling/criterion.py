"""
Set prediction loss of MaskFormer and Mask2Former.

Shape shorthand in this module:

    B: images in the batch
    Q: queries (predictions) per image
    K: classes, the class logits have K + 1 entries (the last one is "no object")
    M: matched (query, target) pairs of the whole batch
    h, w: size of the predicted masks; H, W: size of the (padded) target masks
    P: sampled points per mask (Mask2Former)

Each decoder level (the final prediction and every entry of ``aux_outputs``) is matched to the
targets on its own, then scored with a class loss and a mask loss. MaskFormer (``num_points == 0``)
upsamples the matched masks to the target size and uses sigmoid focal + dice losses; Mask2Former
(``num_points > 0``) compares the masks on importance-sampled points with binary cross-entropy +
dice losses.
"""

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils import comm
from torch import Tensor, nn

from .mask_loss import upsampled_focal_and_dice_loss
from .matcher import DICE_SMOOTH, FOCAL_ALPHA, FOCAL_GAMMA, HungarianMatcher, check_target_labels

__all__ = [
    "SetCriterion",
    "build_criterion",
    "dice_loss",
    "sigmoid_ce_loss",
    "sigmoid_focal_loss",
    "FAMILY_MASKFORMER",
    "FAMILY_MASK2FORMER",
]

FAMILY_MASKFORMER = "MaskFormer"
FAMILY_MASK2FORMER = "Mask2Former"
# MaskFormer hard-codes the class weight of its loss and matching cost (CLASS_WEIGHT is unread).
MASKFORMER_CLASS_WEIGHT = 1.0


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """
    Dice loss of paired masks, summed over masks and divided by ``num_masks``.

    Args:
        inputs (Tensor): [M, D] mask logits.
        targets (Tensor): [M, D] binary (float) targets.
        num_masks (float): normaliser.

    Returns:
        Tensor: scalar.
    """
    probs = inputs.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + DICE_SMOOTH) / (denominator + DICE_SMOOTH)
    return loss.sum() / num_masks


def sigmoid_ce_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """
    Binary cross-entropy with logits, mean over D, summed over masks, divided by ``num_masks``.

    Args:
        inputs (Tensor): [M, D] mask logits.
        targets (Tensor): [M, D] binary (float) targets.
        num_masks (float): normaliser.

    Returns:
        Tensor: scalar.
    """
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    num_masks: float,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
) -> Tensor:
    """
    Sigmoid focal loss, mean over D, summed over masks, divided by ``num_masks``.

    Args:
        inputs (Tensor): [M, D] mask logits.
        targets (Tensor): [M, D] binary (float) targets.
        num_masks (float): normaliser.
        alpha (float): weight of positive pixels (``1 - alpha`` for negative ones).
        gamma (float): focusing exponent on ``1 - p_t``.

    Returns:
        Tensor: scalar.
    """
    probs = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = probs * targets + (1 - probs) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    loss = alpha_t * ce * (1 - p_t) ** gamma
    return loss.mean(1).sum() / num_masks


def calculate_uncertainty(logits: Tensor) -> Tensor:
    """
    Point uncertainty of class-agnostic mask logits: highest where the logit is closest to 0.

    Args:
        logits (Tensor): [M, 1, P] mask logits at points.

    Returns:
        Tensor: [M, 1, P] ``-|logit|``.
    """
    return -logits.abs()


def _matched_query_index(indices: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    """Returns (image index, query index), int64 [M] each, of all matches in image order."""
    image_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return image_idx, query_idx


class SetCriterion(nn.Module):
    """
    Hungarian-matched class and mask losses of MaskFormer / Mask2Former.

    The losses are returned unweighted; ``weight_dict`` is kept for the meta-architecture, which
    multiplies each loss by its weight.
    """

    # Name in ``losses`` -> method computing that group of losses.
    _LOSS_METHODS = {"labels": "loss_labels", "masks": "loss_masks"}

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: List[str],
        num_points: int = 0,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ):
        """
        Args:
            num_classes (int): K, not counting "no object".
            matcher (HungarianMatcher): matches queries to targets, per decoder level.
            weight_dict (dict[str, float]): loss name -> weight (kept, not applied here).
            eos_coef (float): cross-entropy weight of the "no object" class.
            losses (list[str]): which losses to compute, from ``"labels"`` and ``"masks"``.
            num_points (int): 0: MaskFormer mask losses on all pixels; otherwise Mask2Former
                point-sampled mask losses on this many points per mask.
            oversample_ratio (float): Mask2Former: candidate points drawn per point.
            importance_sample_ratio (float): Mask2Former: fraction of the points picked among
                the most uncertain candidates (the rest are uniformly random).
        """
        super().__init__()
        unknown = [name for name in losses if name not in self._LOSS_METHODS]
        if unknown:
            raise ValueError(
                f"unknown losses {unknown}, expected some of {list(self._LOSS_METHODS)}"
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}"
        )

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """
        Args:
            outputs (dict): ``pred_logits`` (Tensor): [B, Q, K + 1] class logits,
                ``pred_masks`` (Tensor): [B, Q, h, w] mask logits and optionally
                ``aux_outputs`` (list[dict]): the same two keys for each intermediate level.
            targets (list[dict]): B dicts with ``labels`` (Tensor): int64 [n] in [0, K) and
                ``masks`` (Tensor): bool or float [n, H, W].

        Returns:
            dict[str, Tensor]: scalar raw losses ``loss_ce``, ``loss_mask``, ``loss_dice`` for the
            final level and the same suffixed ``_i`` for ``aux_outputs[i]``.
        """
        check_target_labels(targets, self.num_classes)
        num_masks = self._num_masks(targets, outputs["pred_logits"].device)
        levels = [("", {k: v for k, v in outputs.items() if k != "aux_outputs"})]
        levels += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]

        losses = {}
        for suffix, level_outputs in levels:
            indices = self.matcher(level_outputs, targets)
            for name in self.losses:
                loss_fn = getattr(self, self._LOSS_METHODS[name])
                level_losses = loss_fn(level_outputs, targets, indices, num_masks)
                losses.update({key + suffix: value for key, value in level_losses.items()})
        return losses

    @staticmethod
    def _num_masks(targets: List[Dict[str, Tensor]], device: torch.device) -> float:
        """Target segments per worker, averaged over all workers, at least 1."""
        num_masks = torch.as_tensor(
            [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float, device=device
        )
        world_size = comm.get_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(num_masks)
        return torch.clamp(num_masks / world_size, min=1).item()

    def loss_labels(
        self,
        outputs: Dict[str, Tensor],
        targets: List[Dict[str, Tensor]],
        indices: List[Tuple[Tensor, Tensor]],
        num_masks: float,
    ) -> Dict[str, Tensor]:
        """
        Cross-entropy over all queries; unmatched queries have the "no object" target.

        Args:
            outputs (dict): ``pred_logits`` (Tensor): [B, Q, K + 1].
            targets (list[dict]): per image ``labels`` (Tensor): int64 [n].
            indices (list[tuple[Tensor, Tensor]]): the matcher's output.
            num_masks (float): unused (the loss is a weighted mean over queries).

        Returns:
            dict[str, Tensor]: ``loss_ce``.
        """
        del num_masks
        logits = outputs["pred_logits"].float()
        matched = _matched_query_index(indices)
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[matched] = torch.cat(
            [t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)]
        ).to(logits.device)
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss_ce}

    def loss_masks(
        self,
        outputs: Dict[str, Tensor],
        targets: List[Dict[str, Tensor]],
        indices: List[Tuple[Tensor, Tensor]],
        num_masks: float,
    ) -> Dict[str, Tensor]:
        """
        Mask and dice losses of the matched pairs (pixel-wise or point-sampled, see the class).

        Args:
            outputs (dict): ``pred_masks`` (Tensor): [B, Q, h, w] mask logits.
            targets (list[dict]): per image ``masks`` (Tensor): [n, H, W].
            indices (list[tuple[Tensor, Tensor]]): the matcher's output.
            num_masks (float): normaliser of both losses.

        Returns:
            dict[str, Tensor]: ``loss_mask`` and ``loss_dice``.
        """
        src_masks = outputs["pred_masks"][_matched_query_index(indices)]
        if src_masks.shape[0] == 0:
            # Nothing matched: zero losses that still reach the graph (no NaN, no missing grads).
            zero = outputs["pred_masks"].sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        target_masks = self._matched_target_masks(targets, indices).to(src_masks)
        if self.num_points > 0:
            src_values, target_values = self._sample_points(src_masks, target_masks)
            return {
                "loss_mask": sigmoid_ce_loss(src_values, target_values, num_masks),
                "loss_dice": dice_loss(src_values, target_values, num_masks),
            }
        # = sigmoid_focal_loss and dice_loss of the logits upsampled to the target size, fused.
        loss_mask, loss_dice = upsampled_focal_and_dice_loss(
            src_masks, target_masks, num_masks, FOCAL_ALPHA, FOCAL_GAMMA
        )
        return {"loss_mask": loss_mask, "loss_dice": loss_dice}

    @staticmethod
    def _matched_target_masks(
        targets: List[Dict[str, Tensor]], indices: List[Tuple[Tensor, Tensor]]
    ) -> Tensor:
        """
        Gathers the matched target masks in match order, zero-padded to the batch's largest size.

        Returns:
            Tensor: [M, H, W] with H, W the largest target mask size of the batch.
        """
        height = max(t["masks"].shape[-2] for t in targets)
        width = max(t["masks"].shape[-1] for t in targets)
        matched = []
        for target, (_, tgt_idx) in zip(targets, indices):
            masks = target["masks"][tgt_idx.to(target["masks"].device)]
            pad = (0, width - masks.shape[-1], 0, height - masks.shape[-2])
            matched.append(F.pad(masks, pad) if any(pad) else masks)
        return torch.cat(matched)

    def _sample_points(self, src_masks: Tensor, target_masks: Tensor) -> Tuple[Tensor, Tensor]:
        """
        Samples matched predictions and targets at importance-sampled points.

        Args:
            src_masks (Tensor): [M, h, w] mask logits (with grad).
            target_masks (Tensor): [M, H, W] float targets.

        Returns:
            tuple[Tensor, Tensor]: [M, P] logits (with grad) and [M, P] target values.
        """
        src_masks = src_masks[:, None]
        with torch.no_grad():
            point_coords = get_uncertain_point_coords_with_randomness(
                src_masks,
                calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            target_values = point_sample(
                target_masks[:, None], point_coords, align_corners=False
            ).squeeze(1)
        src_values = point_sample(src_masks, point_coords, align_corners=False).squeeze(1)
        return src_values, target_values


def _maskformer_settings(mf_cfg) -> Dict:
    """MaskFormer: hard-coded class weight, pixel-wise mask losses."""
    return {"class_weight": MASKFORMER_CLASS_WEIGHT, "num_points": 0}


def _mask2former_settings(mf_cfg) -> Dict:
    """Mask2Former: configured class weight, point-sampled mask losses."""
    # Checked here: 0 points would silently select MaskFormer's pixel-wise losses, and
    # detectron2's point sampling only asserts its ratios at the first training step.
    if mf_cfg.TRAIN_NUM_POINTS < 1:
        raise ValueError(
            "MODEL.MASK_FORMER.TRAIN_NUM_POINTS must be >= 1 for Mask2Former's point-sampled "
            f"matching and losses, got {mf_cfg.TRAIN_NUM_POINTS}"
        )
    if mf_cfg.OVERSAMPLE_RATIO < 1:
        raise ValueError(
            f"MODEL.MASK_FORMER.OVERSAMPLE_RATIO must be >= 1, got {mf_cfg.OVERSAMPLE_RATIO}"
        )
    if not 0 <= mf_cfg.IMPORTANCE_SAMPLE_RATIO <= 1:
        raise ValueError(
            "MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO must be in [0, 1], got "
            f"{mf_cfg.IMPORTANCE_SAMPLE_RATIO}"
        )
    return {
        "class_weight": mf_cfg.CLASS_WEIGHT,
        "num_points": mf_cfg.TRAIN_NUM_POINTS,
        "oversample_ratio": mf_cfg.OVERSAMPLE_RATIO,
        "importance_sample_ratio": mf_cfg.IMPORTANCE_SAMPLE_RATIO,
    }


# Family name -> reader of the family's criterion settings from cfg.MODEL.MASK_FORMER.
_FAMILY_SETTINGS = {
    FAMILY_MASKFORMER: _maskformer_settings,
    FAMILY_MASK2FORMER: _mask2former_settings,
}


def build_criterion(cfg, num_classes: int, family: str) -> SetCriterion:
    """
    Builds the matcher and criterion of a family from ``cfg.MODEL.MASK_FORMER``.

    Args:
        cfg (CfgNode): a config with the keys of :func:`mask_former.add_mask_former_config`.
        num_classes (int): K.
        family (str): ``"MaskFormer"`` or ``"Mask2Former"``.

    Returns:
        SetCriterion: with its ``matcher`` and ``weight_dict`` (deep supervision included).
    """
    if family not in _FAMILY_SETTINGS:
        raise ValueError(f"unknown family {family!r}, expected one of {sorted(_FAMILY_SETTINGS)}")
    mf_cfg = cfg.MODEL.MASK_FORMER
    settings = _FAMILY_SETTINGS[family](mf_cfg)
    class_weight = settings.pop("class_weight")
    matcher = HungarianMatcher(
        cost_class=class_weight,
        cost_mask=mf_cfg.MASK_WEIGHT,
        cost_dice=mf_cfg.DICE_WEIGHT,
        num_points=settings["num_points"],
    )
    level_weights = {
        "loss_ce": class_weight,
        "loss_mask": mf_cfg.MASK_WEIGHT,
        "loss_dice": mf_cfg.DICE_WEIGHT,
    }
    weight_dict = dict(level_weights)
    if mf_cfg.DEEP_SUPERVISION:
        # One auxiliary prediction per decoder level but the last, in both families.
        for i in range(mf_cfg.DEC_LAYERS - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in level_weights.items()})
    return SetCriterion(
        num_classes,
        matcher=matcher,
        weight_dict=weight_dict,
        eos_coef=mf_cfg.NO_OBJECT_WEIGHT,
        losses=["labels", "masks"],
        **settings,
    )
