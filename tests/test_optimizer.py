"""Optimizer parameter groups (backbone lr, norm / embedding / Swin weight decay, shared and frozen
parameters) and gradient clipping (full model, detectron2's per-parameter, off)."""

import pytest
import torch
from conftest import set_flat, tiny_cfg
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from torch import nn

from mask_former.engine import build_optimizer, get_param_groups
from mask_former.engine.optimizer import most_common_lr_group

BASE_LR, MULTIPLIER = 1.0, 0.1
DECAY, DECAY_NORM, DECAY_EMBED = 0.05, 0.25, 0.5


class _SwinBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(3, 2))
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4))
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4)


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.frozen_bn = FrozenBatchNorm2d(4)
        self.block = _SwinBlock()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


class _Toy(nn.Module):
    """A model with every kind of parameter the rules distinguish."""

    def __init__(self):
        super().__init__()
        self.backbone = _Backbone()
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.lrn = nn.LocalResponseNorm(2)  # no parameters
        self.query_embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 2)
        self.tied = nn.Linear(4, 2)
        self.tied.weight = self.head.weight  # shared parameter: one group only
        self.shared_module = self.backbone.conv  # shared module: stays a backbone parameter


# parameter name (as model.named_parameters() gives it) -> (lr, weight decay)
EXPECTED = {
    "backbone.conv.weight": (BASE_LR * MULTIPLIER, DECAY),
    "backbone.conv.bias": (BASE_LR * MULTIPLIER, DECAY),
    "backbone.bn.weight": (BASE_LR * MULTIPLIER, DECAY_NORM),
    "backbone.bn.bias": (BASE_LR * MULTIPLIER, DECAY_NORM),
    "backbone.block.relative_position_bias_table": (BASE_LR * MULTIPLIER, 0.0),
    "backbone.block.absolute_pos_embed": (BASE_LR * MULTIPLIER, 0.0),
    "backbone.block.norm.weight": (BASE_LR * MULTIPLIER, DECAY_NORM),
    "backbone.block.norm.bias": (BASE_LR * MULTIPLIER, DECAY_NORM),
    "backbone.block.proj.weight": (BASE_LR * MULTIPLIER, DECAY),
    "backbone.block.proj.bias": (BASE_LR * MULTIPLIER, DECAY),
    "gn.weight": (BASE_LR, DECAY_NORM),
    "gn.bias": (BASE_LR, DECAY_NORM),
    "inorm.weight": (BASE_LR, DECAY_NORM),
    "inorm.bias": (BASE_LR, DECAY_NORM),
    "query_embed.weight": (BASE_LR, DECAY_EMBED),
    "head.weight": (BASE_LR, DECAY),
    "head.bias": (BASE_LR, DECAY),
    "tied.bias": (BASE_LR, DECAY),
}


def _groups(model):
    return get_param_groups(
        model,
        base_lr=BASE_LR,
        weight_decay=DECAY,
        weight_decay_norm=DECAY_NORM,
        weight_decay_embed=DECAY_EMBED,
        backbone_multiplier=MULTIPLIER,
    )


def _assignment(model, groups):
    """parameter name -> (lr, weight decay) of the group holding it; fails on duplicates."""
    names = {param: name for name, param in model.named_parameters()}
    assigned = {}
    for group in groups:
        for param in group["params"]:
            name = names[param]
            assert name not in assigned, f"{name} is in two groups"
            assigned[name] = (group["lr"], group["weight_decay"])
    return assigned


def test_param_groups_follow_the_published_rules():
    model = _Toy()
    groups = _groups(model)
    assert _assignment(model, groups) == EXPECTED
    # Groups with equal hyperparameters are merged.
    assert len(groups) == len(set(EXPECTED.values()))


def test_param_groups_of_a_wrapped_model_are_the_same():
    """The walk goes by module path, so a wrapper (e.g. DistributedDataParallel's ``module.``)
    changes nothing."""
    wrapper = nn.Module()
    wrapper.module = _Toy()
    assigned = _assignment(wrapper, _groups(wrapper))
    assert {k.removeprefix("module."): v for k, v in assigned.items()} == EXPECTED


NORM_LAYERS = {
    "BatchNorm1d": lambda: nn.BatchNorm1d(4),
    "BatchNorm3d": lambda: nn.BatchNorm3d(4),
    "SyncBatchNorm": lambda: nn.SyncBatchNorm(4),
    "NaiveSyncBatchNorm": lambda: NaiveSyncBatchNorm(4),
    "InstanceNorm1d": lambda: nn.InstanceNorm1d(4, affine=True),
    "InstanceNorm3d": lambda: nn.InstanceNorm3d(4, affine=True),
    "GroupNorm": lambda: nn.GroupNorm(2, 4),
    "LayerNorm": lambda: nn.LayerNorm(4),
}


@pytest.mark.parametrize("norm", NORM_LAYERS)
def test_every_norm_layer_gets_the_norm_weight_decay(norm):
    model = nn.Sequential(nn.Linear(4, 4), NORM_LAYERS[norm]())
    expected = {"0.weight": DECAY, "0.bias": DECAY, "1.weight": DECAY_NORM, "1.bias": DECAY_NORM}
    assigned = _assignment(model, _groups(model))
    assert {name: decay for name, (_, decay) in assigned.items()} == expected


def _cfg(**solver):
    cfg = tiny_cfg()
    set_flat(cfg, {"SOLVER.BASE_LR": BASE_LR, "SOLVER.WEIGHT_DECAY": 0.0})
    set_flat(cfg, {"SOLVER.WEIGHT_DECAY_NORM": 0.0, "SOLVER.WEIGHT_DECAY_EMBED": 0.0})
    set_flat(cfg, {"SOLVER.BACKBONE_MULTIPLIER": 1.0, "SOLVER.OPTIMIZER": "SGD"})
    set_flat(cfg, {"SOLVER.MOMENTUM": 0.0})
    set_flat(cfg, {f"SOLVER.{key.replace('__', '.')}": value for key, value in solver.items()})
    return cfg


def _step_with_gradients(cfg, gradients):
    """One SGD step (lr 1, no momentum / decay) from zero weights; returns -update per param."""
    model = nn.ParameterDict({k: nn.Parameter(torch.zeros_like(g)) for k, g in gradients.items()})
    optimizer = build_optimizer(cfg, model)
    for name, param in model.items():
        param.grad = gradients[name].clone()
    optimizer.step()
    return {name: -param.detach() for name, param in model.items()}


GRADIENTS = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 12.0])}  # norms 5, 12; 13


def test_full_model_clipping_scales_all_gradients_together():
    cfg = _cfg(CLIP_GRADIENTS__ENABLED=True, CLIP_GRADIENTS__CLIP_TYPE="full_model")
    set_flat(cfg, {"SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 1.3})
    updates = _step_with_gradients(cfg, GRADIENTS)
    for name, gradient in GRADIENTS.items():
        assert torch.allclose(updates[name], gradient * 0.1, atol=1e-5)  # 13 -> 1.3


def test_per_parameter_clipping_uses_detectron2():
    cfg = _cfg(CLIP_GRADIENTS__ENABLED=True, CLIP_GRADIENTS__CLIP_TYPE="norm")
    set_flat(cfg, {"SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 1.0})
    updates = _step_with_gradients(cfg, GRADIENTS)
    assert torch.allclose(updates["a"], GRADIENTS["a"] / 5, atol=1e-5)
    assert torch.allclose(updates["b"], GRADIENTS["b"] / 12, atol=1e-5)
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    updates = _step_with_gradients(cfg, GRADIENTS)
    assert torch.equal(updates["a"], torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("enabled,clip_value", [(False, 1.0), (True, 0.0)])
def test_no_clipping_when_disabled_or_zero(enabled, clip_value):
    cfg = _cfg(CLIP_GRADIENTS__ENABLED=enabled, CLIP_GRADIENTS__CLIP_TYPE="full_model")
    set_flat(cfg, {"SOLVER.CLIP_GRADIENTS.CLIP_VALUE": clip_value})
    updates = _step_with_gradients(cfg, GRADIENTS)
    for name, gradient in GRADIENTS.items():
        assert torch.equal(updates[name], gradient)


def test_optimizer_kinds():
    cfg = _cfg(MOMENTUM=0.9)
    optimizer = build_optimizer(cfg, _Toy())
    assert isinstance(optimizer, torch.optim.SGD)
    assert {group["momentum"] for group in optimizer.param_groups} == {0.9}
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    assert isinstance(build_optimizer(cfg, _Toy()), torch.optim.AdamW)
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="LAMB"):
        build_optimizer(cfg, _Toy())


def test_adamw_is_fused_where_available_and_steps_like_the_reference():
    from detectron2.utils.env import TORCH_VERSION

    from mask_former.engine.optimizer import fused_adamw_available

    assert fused_adamw_available("cpu") == (TORCH_VERSION >= (2, 4))
    assert not fused_adamw_available("meta")
    cfg = _cfg(OPTIMIZER="ADAMW", WEIGHT_DECAY=0.05, CLIP_GRADIENTS__ENABLED=True)
    set_flat(cfg, {"SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model"})
    set_flat(cfg, {"SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 0.01, "MODEL.DEVICE": "cpu"})
    torch.manual_seed(0)
    ours, reference = _Toy(), _Toy()
    reference.load_state_dict(ours.state_dict())
    optimizer = build_optimizer(cfg, ours)
    assert all(bool(g["fused"]) == fused_adamw_available("cpu") for g in optimizer.param_groups)
    # The same groups (learning rates, weight decays) over the reference's parameters.
    ref_params = dict(zip([id(p) for p in ours.parameters()], reference.parameters()))
    ref_groups = [
        {
            "params": [ref_params[id(p)] for p in g["params"]],
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
        }
        for g in optimizer.param_groups
    ]
    ref_optimizer = torch.optim.AdamW(ref_groups, lr=BASE_LR, foreach=False)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for _ in range(3):
        for param in params:
            param.grad = torch.randn_like(param)
            ref_params[id(param)].grad = param.grad.clone()
        optimizer.step()
        torch.nn.utils.clip_grad_norm_([ref_params[id(p)] for p in params], 0.01)
        ref_optimizer.step()
    for param in params:
        ref = ref_params[id(param)]
        torch.testing.assert_close(param, ref, atol=1e-6, rtol=1e-5)


def test_adamw_is_not_fused_under_cuda_amp():
    # GradScaler would hand a fused optimizer still-scaled gradients, and clipping runs first.
    cfg = _cfg(OPTIMIZER="ADAMW", AMP__ENABLED=True)
    set_flat(cfg, {"MODEL.DEVICE": "cuda"})
    optimizer = build_optimizer(cfg, _Toy())
    assert not any(g["fused"] for g in optimizer.param_groups)
    cfg.SOLVER.AMP.ENABLED = False
    optimizer = build_optimizer(cfg, _Toy())
    assert all(g["fused"] for g in optimizer.param_groups)


def test_logged_lr_is_the_one_most_parameters_have():
    """The published optimizer has a group per parameter, so detectron2's LRScheduler hook logs
    the most common learning rate; with merged groups it would pick the largest group's."""
    from detectron2.engine.hooks import LRScheduler

    params = [nn.Parameter(torch.zeros(1)) for _ in range(7)]
    optimizer = torch.optim.SGD(
        [
            {"params": params[:3], "lr": 1e-4},
            {"params": params[3:5], "lr": 1e-5, "weight_decay": 0.0},
            {"params": params[5:], "lr": 1e-5},
        ],
        lr=1e-4,
    )
    assert LRScheduler.get_best_param_group_id(optimizer) == 0  # the largest group
    assert most_common_lr_group(optimizer) == 1  # 4 parameters have 1e-5
    per_parameter = torch.optim.SGD(
        [{"params": [p], "lr": g["lr"]} for g in optimizer.param_groups for p in g["params"]],
        lr=1e-4,
    )
    published = per_parameter.param_groups[LRScheduler.get_best_param_group_id(per_parameter)]
    assert published["lr"] == optimizer.param_groups[most_common_lr_group(optimizer)]["lr"]
