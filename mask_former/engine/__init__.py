"""Training helpers used by ``train_net.py`` (optimizer, CPU-capable launch, trainer steps,
allocator tuning) and the batched predictor."""

from .defaults import (
    amp_enabled,
    build_step_trainer,
    cpu_bf16_enabled,
    cpu_has_native_bf16,
    create_ddp_model,
    use_cpu_without_cuda,
)
from .launch import launch
from .malloc import tune_malloc
from .optimizer import MostCommonLRScheduler, build_optimizer, get_param_groups
from .predictor import BatchPredictor

__all__ = [
    "BatchPredictor",
    "MostCommonLRScheduler",
    "amp_enabled",
    "build_optimizer",
    "build_step_trainer",
    "cpu_bf16_enabled",
    "cpu_has_native_bf16",
    "create_ddp_model",
    "get_param_groups",
    "launch",
    "tune_malloc",
    "use_cpu_without_cuda",
]
