"""The optimizer of MaskFormer / Mask2Former training: per-parameter groups and gradient clipping.

The published rules, per parameter (later rules win):

- learning rate ``SOLVER.BASE_LR``, times ``SOLVER.BACKBONE_MULTIPLIER`` when the name of the module
  that owns the parameter contains "backbone";
- weight decay ``SOLVER.WEIGHT_DECAY``; 0 for Swin's ``relative_position_bias_table`` and
  ``absolute_pos_embed``; ``SOLVER.WEIGHT_DECAY_NORM`` for parameters of normalisation layers;
  ``SOLVER.WEIGHT_DECAY_EMBED`` for ``nn.Embedding`` weights.

detectron2's ``get_default_optimizer_params`` cannot express the first and the last rule: it picks
hyperparameters by module type (norm layers only) and by a parameter's own name (``weight``,
``bias``, ...), never by the module's path in the model. So :func:`get_param_groups` walks the model
the same way and reuses detectron2's ``reduce_param_groups`` to merge equal groups.
"""

import collections
import inspect
import itertools
import logging
from typing import Any, Dict, List

import torch
from detectron2.engine import hooks
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups
from detectron2.utils.env import TORCH_VERSION
from torch import nn

__all__ = [
    "build_optimizer",
    "fused_adamw_available",
    "get_param_groups",
    "most_common_lr_group",
    "MostCommonLRScheduler",
    "NORM_MODULE_TYPES",
]

logger = logging.getLogger(__name__)

NORM_MODULE_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    FrozenBatchNorm2d,  # has no parameters today; listed so that a trainable variant is covered
    NaiveSyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
# Swin parameters that are never decayed, matched as substrings of the parameter's own name.
NO_WEIGHT_DECAY_PARAM_NAMES = ("relative_position_bias_table", "absolute_pos_embed")
# Parameters of modules whose name contains this get the backbone learning-rate multiplier.
BACKBONE_MODULE_KEYWORD = "backbone"


def _weight_decay(module, param_name, *, weight_decay, weight_decay_norm, weight_decay_embed):
    """The weight decay of one parameter (published precedence: Swin names < norm < embedding)."""
    if any(name in param_name for name in NO_WEIGHT_DECAY_PARAM_NAMES):
        weight_decay = 0.0
    if isinstance(module, NORM_MODULE_TYPES):
        weight_decay = weight_decay_norm
    if isinstance(module, nn.Embedding):
        weight_decay = weight_decay_embed
    return weight_decay


def get_param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    weight_decay_embed: float,
    backbone_multiplier: float,
) -> List[Dict[str, Any]]:
    """
    Optimizer parameter groups of ``model`` by the rules in the module docstring.

    Every trainable parameter lands in exactly one group, also when modules share it (the first
    module that owns it decides); frozen parameters are left out.

    Args:
        model (nn.Module): the model (or its DistributedDataParallel wrapper).
        base_lr (float): learning rate of non-backbone parameters.
        weight_decay (float): default weight decay.
        weight_decay_norm (float): weight decay of normalisation-layer parameters.
        weight_decay_embed (float): weight decay of ``nn.Embedding`` weights.
        backbone_multiplier (float): learning-rate factor of backbone parameters.

    Returns:
        list[dict]: groups with keys ``params``, ``lr`` and ``weight_decay``, one per distinct
        (lr, weight_decay) pair.
    """
    params: List[Dict[str, Any]] = []
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            in_backbone = BACKBONE_MODULE_KEYWORD in module_name
            decay = _weight_decay(
                module,
                param_name,
                weight_decay=weight_decay,
                weight_decay_norm=weight_decay_norm,
                weight_decay_embed=weight_decay_embed,
            )
            lr = base_lr * backbone_multiplier if in_backbone else base_lr
            params.append({"params": [param], "lr": lr, "weight_decay": decay})
    return reduce_param_groups(params)


def _with_full_model_gradient_clipping(optimizer_type, clip_value, norm_type):
    """A subclass of ``optimizer_type`` whose ``step`` first clips the gradients of all parameters
    together to a global norm of at most ``clip_value``."""

    class FullModelGradientClippingOptimizer(optimizer_type):
        def step(self, closure=None):
            all_params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
            torch.nn.utils.clip_grad_norm_(all_params, clip_value, norm_type)
            return super().step(closure=closure)

    FullModelGradientClippingOptimizer.__name__ = optimizer_type.__name__ + "WithFullModelClipping"
    FullModelGradientClippingOptimizer.__qualname__ = FullModelGradientClippingOptimizer.__name__
    return FullModelGradientClippingOptimizer


def fused_adamw_available(device) -> bool:
    """
    Whether ``torch.optim.AdamW(fused=True)`` runs on ``device``: CUDA since torch 2.0, CPU since
    2.4. The fused kernel updates each tensor in one pass instead of about ten (on the 2-core
    development machine: 22 ms instead of 64 ms per step for the 41 M parameters of MaskFormer
    R50); it computes the same update up to float rounding.
    """
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    device_type = torch.device(device).type
    if device_type == "cuda":
        return True
    return device_type == "cpu" and TORCH_VERSION >= (2, 4)


def _use_fused_adamw(cfg) -> bool:
    """
    Fused AdamW where available, except under CUDA AMP: ``GradScaler.step`` leaves the gradients
    of a fused optimizer scaled (the kernel unscales them), so the gradient clipping that runs at
    the start of ``step`` would see scaled gradients. A non-fused optimizer gets them unscaled.
    """
    device_type = torch.device(cfg.MODEL.DEVICE).type
    if cfg.SOLVER.AMP.ENABLED and device_type == "cuda":
        return False
    return fused_adamw_available(cfg.MODEL.DEVICE)


def _optimizer_type(cfg):
    """The optimizer class (with gradient clipping, if configured) and its extra arguments."""
    solver = cfg.SOLVER
    optimizers = {
        "SGD": (torch.optim.SGD, {"momentum": solver.MOMENTUM}),
        "ADAMW": (torch.optim.AdamW, {"fused": True} if _use_fused_adamw(cfg) else {}),
    }
    if solver.OPTIMIZER not in optimizers:
        raise ValueError(
            f"Unknown SOLVER.OPTIMIZER {solver.OPTIMIZER!r}; expected one of {sorted(optimizers)}"
        )
    optimizer_type, kwargs = optimizers[solver.OPTIMIZER]
    clip = solver.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        if clip.CLIP_VALUE > 0:
            optimizer_type = _with_full_model_gradient_clipping(
                optimizer_type, clip.CLIP_VALUE, clip.NORM_TYPE
            )
    else:
        optimizer_type = maybe_add_gradient_clipping(cfg, optimizer_type)
    return optimizer_type, kwargs


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """
    The optimizer of ``SOLVER.OPTIMIZER`` ("ADAMW", fused where :func:`fused_adamw_available`
    for ``MODEL.DEVICE`` unless CUDA AMP is on, or "SGD" with ``SOLVER.MOMENTUM``) over
    :func:`get_param_groups`, with full-model gradient-norm clipping when
    ``SOLVER.CLIP_GRADIENTS.ENABLED`` and ``CLIP_TYPE`` is "full_model", otherwise detectron2's
    per-parameter clipping (``maybe_add_gradient_clipping``).

    Args:
        cfg (CfgNode): the config.
        model (nn.Module): the model to optimize.
    """
    solver = cfg.SOLVER
    params = get_param_groups(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        weight_decay_embed=solver.WEIGHT_DECAY_EMBED,
        backbone_multiplier=solver.BACKBONE_MULTIPLIER,
    )
    optimizer_type, kwargs = _optimizer_type(cfg)
    logger.info(
        "Optimizer %s%s with %d parameter groups",
        optimizer_type.__name__,
        " (fused)" if kwargs.get("fused") else "",
        len(params),
    )
    return optimizer_type(params, lr=solver.BASE_LR, **kwargs)


def most_common_lr_group(optimizer: torch.optim.Optimizer) -> int:
    """Index of the first parameter group whose learning rate the most parameters have.

    The published optimizer has one group per parameter, so detectron2's ``LRScheduler`` hook logs
    that learning rate as "lr". Our groups are merged (:func:`get_param_groups`), and the hook would
    log the learning rate of the group with the most parameters instead, which can differ (e.g. the
    backbone's rate when a multiplier applies, spread over several groups).
    """
    # By the base learning rates (set by the LR scheduler), which keep their ratios over training.
    base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    counts = collections.Counter()
    for lr, group in zip(base_lrs, optimizer.param_groups):
        counts[lr] += len(group["params"])
    most_common = counts.most_common(1)[0][0]
    return base_lrs.index(most_common)


class MostCommonLRScheduler(hooks.LRScheduler):
    """detectron2's ``LRScheduler`` hook logging, as "lr", the learning rate that the most
    parameters have (:func:`most_common_lr_group`), as it does for the published optimizer."""

    def before_train(self):
        super().before_train()
        self._best_param_group_id = most_common_lr_group(self._optimizer)
