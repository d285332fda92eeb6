"""
Hungarian matching between predicted masks and ground-truth segments.

Shape shorthand in this module:

    B: images in the batch
    Q: queries (predictions) per image
    K: classes, the class logits have K + 1 entries (the last one is "no object")
    n: target segments of one image, N: target segments of the whole batch
    h, w: size of the predicted masks; H, W: size of the target masks
    P: sampled points per mask (Mask2Former)

Two published cost variants exist. MaskFormer (``num_points == 0``) compares every pixel at the
resolution of the predictions, with a sigmoid focal cost; Mask2Former (``num_points > 0``)
compares the masks on ``P`` random points shared by all pairs of one image, with a binary
cross-entropy cost. Both add a dice cost and the negative class probability.
"""

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

__all__ = [
    "HungarianMatcher",
    "batch_dice_cost",
    "batch_sigmoid_ce_cost",
    "batch_sigmoid_focal_cost",
    "check_target_labels",
]

# Published focal-loss constants (MaskFormer hard-codes them for both matching and loss).
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
# Additive smoothing of the dice ratio, in numerator and denominator.
DICE_SMOOTH = 1.0


def check_target_labels(targets: List[Dict[str, Tensor]], num_classes: int) -> None:
    """
    Raises ``ValueError`` if a target label is not a valid class index.

    Args:
        targets (list[dict]): per image, ``labels`` (Tensor): int64 [n].
        num_classes (int): K; valid labels are 0 .. K - 1 (K is "no object", never a target).
    """
    for image_idx, target in enumerate(targets):
        labels = target["labels"]
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.numel() > 0:
            raise ValueError(
                f"target label {int(bad[0])} of image {image_idx} is outside [0, {num_classes}) "
                f"(num_classes={num_classes})"
            )


def batch_dice_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """
    Dice cost of every prediction against every target.

    Args:
        inputs (Tensor): [M, D] mask logits.
        targets (Tensor): [N, D] binary (float) targets.

    Returns:
        Tensor: [M, N], ``1 - (2 <sigmoid(x), t> + 1) / (sum sigmoid(x) + sum t + 1)``.
    """
    return _dice_cost(inputs.sigmoid(), targets)


def _dice_cost(probs: Tensor, targets: Tensor) -> Tensor:
    """:func:`batch_dice_cost` from the [M, D] probabilities ``sigmoid(inputs)``."""
    numerator = 2 * probs @ targets.t()
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + DICE_SMOOTH) / (denominator + DICE_SMOOTH)


def _cross_entropies(inputs: Tensor) -> Tuple[Tensor, Tensor]:
    """
    Binary cross-entropy with logits of every logit against target 1 and against target 0.

    Bit for bit what ``F.binary_cross_entropy_with_logits(inputs, ones / zeros)`` returns for
    finite logits: torch computes ``(1 - t) * x - log_sigmoid(x)``, which is ``-log_sigmoid(x)``
    for t = 1 and ``x - log_sigmoid(x)`` for t = 0; ``log_sigmoid`` is computed once and no
    constant target tensors are made. (An infinite logit gives NaN there, and no NaN here.)
    """
    log_sigmoid = F.logsigmoid(inputs)
    return log_sigmoid.neg(), inputs - log_sigmoid


def batch_sigmoid_ce_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """
    Binary cross-entropy (with logits) of every prediction against every target, mean over D.

    Args:
        inputs (Tensor): [M, D] mask logits.
        targets (Tensor): [N, D] binary (float) targets.

    Returns:
        Tensor: [M, N] mean cross-entropy.
    """
    pos, neg = _cross_entropies(inputs)
    cost = pos @ targets.t() + neg @ (1 - targets).t()
    return cost / inputs.shape[1]


def batch_sigmoid_focal_cost(
    inputs: Tensor, targets: Tensor, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA
) -> Tensor:
    """
    Sigmoid focal loss of every prediction against every target, mean over D.

    Args:
        inputs (Tensor): [M, D] mask logits.
        targets (Tensor): [N, D] binary (float) targets.
        alpha (float): weight of the positive term (``1 - alpha`` weighs the negative term).
        gamma (float): focusing exponent.

    Returns:
        Tensor: [M, N] mean focal loss.
    """
    return _focal_cost(inputs, inputs.sigmoid(), targets, alpha, gamma)


def _focal_cost(
    inputs: Tensor, probs: Tensor, targets: Tensor, alpha: float, gamma: float
) -> Tensor:
    """:func:`batch_sigmoid_focal_cost` given also ``probs = sigmoid(inputs)``.

    The published formula ``alpha * (1 - p) ** gamma * ce(x, 1)`` (and its negative twin) with the
    same operations in the same order; the [M, D] temporaries are updated in place.
    """
    pos_ce, neg_ce = _cross_entropies(inputs)
    pos = (1 - probs).pow_(gamma).mul_(pos_ce).mul_(alpha)
    neg = probs.pow(gamma).mul_(neg_ce).mul_(1 - alpha)
    cost = pos @ targets.t() + neg @ (1 - targets).t()
    return cost / inputs.shape[1]


def _assign(cost: Tensor) -> Tuple[Tensor, Tensor]:
    """Solves one assignment problem; ``cost`` is a CPU [Q, n] matrix."""
    src_idx, tgt_idx = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(src_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64)


class HungarianMatcher(nn.Module):
    """
    One-to-one matching of queries to target segments with minimal total cost.

    The cost of query q and target t is
    ``cost_mask * mask_cost + cost_class * (-prob[q, label_t]) + cost_dice * dice_cost``,
    computed in float32. Queries left over are "no object".
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_mask: float = 1.0,
        cost_dice: float = 1.0,
        num_points: int = 0,
    ):
        """
        Args:
            cost_class (float): weight of the negative class probability.
            cost_mask (float): weight of the mask cost (focal if ``num_points == 0``, else BCE).
            cost_dice (float): weight of the dice cost.
            num_points (int): 0: compare all pixels at the prediction resolution (MaskFormer);
                otherwise compare on this many random points per image (Mask2Former).
        """
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching costs are 0")
        if num_points < 0:
            raise ValueError(f"num_points must be >= 0, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            outputs (dict): ``pred_logits`` (Tensor): [B, Q, K + 1] class logits and
                ``pred_masks`` (Tensor): [B, Q, h, w] mask logits. Other keys are ignored.
            targets (list[dict]): B dicts with ``labels`` (Tensor): int64 [n] and
                ``masks`` (Tensor): bool or float [n, H, W].

        Returns:
            list[tuple[Tensor, Tensor]]: per image ``(src_idx, tgt_idx)``, int64 [min(Q, n)] each:
            query ``src_idx[i]`` (ascending) is matched to target ``tgt_idx[i]``.
        """
        return [_assign(cost) for cost in self.compute_costs(outputs, targets)]

    @torch.no_grad()
    def compute_costs(
        self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]
    ) -> List[Tensor]:
        """
        Returns the cost matrices that :meth:`forward` assigns, arguments as there.

        Returns:
            list[Tensor]: per image a float32 CPU [Q, n] cost matrix.
        """
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(
                f"{len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]} images"
            )
        # Autocast would otherwise turn the matrix products into fp16, which the costs must avoid.
        with torch.autocast(device_type=outputs["pred_masks"].device.type, enabled=False):
            if self.num_points > 0:
                return self._point_costs(outputs, targets)
            return self._pixel_costs(outputs, targets)

    def _total_cost(
        self, class_prob: Tensor, labels: Tensor, mask_cost: Tensor, dice_cost: Tensor
    ) -> Tensor:
        """Combines [M, K + 1] class probabilities and [M, N] mask costs into an [M, N] cost."""
        class_cost = -class_prob[:, labels]
        return (
            self.cost_mask * mask_cost + self.cost_class * class_cost + self.cost_dice * dice_cost
        )

    def _pixel_costs(
        self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]
    ) -> List[Tensor]:
        """
        MaskFormer costs at the predictions' resolution, one [Q, n] matrix per image.

        Image by image, as published: a matrix product over the whole batch's targets would
        compute the B - 1 off-diagonal blocks for nothing, and its rounding would depend on the
        other images' targets.
        """
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        num_queries = pred_masks.shape[1]
        class_prob = pred_logits.float().softmax(-1)
        costs = []
        for image_idx, target in enumerate(targets):
            labels = target["labels"]
            if len(labels) == 0:
                costs.append(torch.zeros(num_queries, 0))
                continue
            logits = pred_masks[image_idx].flatten(1).float()
            target_masks = self._downsample(target["masks"], pred_masks.shape[-2:])
            target_masks = target_masks.to(logits.device)
            probs = logits.sigmoid()
            cost = self._total_cost(
                class_prob[image_idx],
                labels.to(class_prob.device),
                _focal_cost(logits, probs, target_masks, FOCAL_ALPHA, FOCAL_GAMMA),
                _dice_cost(probs, target_masks),
            )
            costs.append(cost.cpu())
        return costs

    @staticmethod
    def _downsample(masks: Tensor, size) -> Tensor:
        """Resizes [n, H, W] target masks to ``size`` (nearest) and flattens them to [n, h * w]."""
        masks = F.interpolate(masks[:, None].float(), size=tuple(size), mode="nearest")
        return masks.flatten(1)

    def _point_costs(
        self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]
    ) -> List[Tensor]:
        """Mask2Former costs on ``num_points`` random points per image (shared by all pairs)."""
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        # One draw per image in image order, empty images included: the published RNG sequence.
        point_coords = torch.cat(
            [torch.rand(1, self.num_points, 2, device=pred_masks.device) for _ in targets]
        )
        # Float32 sampling: under AMP the masks are half precision, and the published code samples
        # them with autocast on, where grid_sample promotes them to the float32 of the points.
        pred_points = point_sample(pred_masks.float(), point_coords, align_corners=False)

        costs = []
        for image_idx, target in enumerate(targets):
            labels = target["labels"].to(pred_logits.device)
            if len(labels) == 0:
                costs.append(torch.zeros(pred_masks.shape[1], 0))
                continue
            target_masks = target["masks"].to(device=pred_masks.device, dtype=torch.float32)
            target_points = point_sample(
                target_masks[None], point_coords[image_idx : image_idx + 1], align_corners=False
            )[0]
            preds = pred_points[image_idx]
            cost = self._total_cost(
                pred_logits[image_idx].float().softmax(-1),
                labels,
                batch_sigmoid_ce_cost(preds, target_points),
                batch_dice_cost(preds, target_points),
            )
            costs.append(cost.cpu())
        return costs
