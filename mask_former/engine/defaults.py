"""The steps of detectron2's training and inference set-up that assume CUDA, made device-aware.

- detectron2's default ``MODEL.DEVICE`` is "cuda"; on a machine without CUDA,
  ``use_cpu_without_cuda`` switches the config to the CPU (logged) instead of failing deep inside
  ``model.to``.

- ``create_ddp_model`` passes ``device_ids=[local_rank]``, which DistributedDataParallel rejects
  for a CPU module (v0.6 and main alike).
- ``AMPTrainer`` asserts CUDA in v0.6; published Mask2Former configs enable ``SOLVER.AMP``, so on
  CPU those configs train in fp32 instead (logged). ``SOLVER.AMP.CPU_BF16`` (ours) trains on CPU
  under ``torch.autocast("cpu", dtype=torch.bfloat16)`` instead.

The step trainers also free the gradients after each optimizer step (see ``LeanSimpleTrainer``).
"""

import logging
import platform
import time

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.engine import create_ddp_model as d2_create_ddp_model
from detectron2.utils import comm

__all__ = [
    "CPUAutocastTrainer",
    "LeanAMPTrainer",
    "LeanCPUAutocastTrainer",
    "LeanSimpleTrainer",
    "amp_enabled",
    "build_step_trainer",
    "cpu_bf16_enabled",
    "cpu_has_native_bf16",
    "create_ddp_model",
    "use_cpu_without_cuda",
]

logger = logging.getLogger(__name__)


def use_cpu_without_cuda(cfg):
    """Sets ``MODEL.DEVICE`` to "cpu" (with a warning) when it names CUDA and CUDA is unavailable.

    Args:
        cfg (CfgNode): a config that is not frozen; changed in place.

    Returns:
        CfgNode: ``cfg``.
    """
    if torch.device(cfg.MODEL.DEVICE).type == "cuda" and not torch.cuda.is_available():
        logger.warning(
            "MODEL.DEVICE is %r but CUDA is not available: using the CPU", cfg.MODEL.DEVICE
        )
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def create_ddp_model(model, **kwargs):
    """
    detectron2's ``create_ddp_model`` (the model itself when there is one process), also for a
    model on CPU, which DistributedDataParallel takes without ``device_ids``.

    Args:
        model (nn.Module): the model, already on its device.
        kwargs: arguments of DistributedDataParallel.
    """
    on_cpu = next(model.parameters()).device.type == "cpu"
    if comm.get_world_size() > 1 and on_cpu:
        kwargs.setdefault("device_ids", None)
    return d2_create_ddp_model(model, **kwargs)


def amp_enabled(cfg):
    """Whether to train with AMP: ``SOLVER.AMP.ENABLED`` and the model on an available CUDA
    device. Logs a warning when AMP is requested but skipped."""
    if not cfg.SOLVER.AMP.ENABLED:
        return False
    if torch.device(cfg.MODEL.DEVICE).type == "cuda" and torch.cuda.is_available():
        return True
    if cfg.SOLVER.AMP.get("CPU_BF16", False):
        outcome = "CUDA AMP skipped (SOLVER.AMP.CPU_BF16 decides about bfloat16 on the CPU)"
    else:
        outcome = "AMP skipped, training in fp32 (SOLVER.AMP.CPU_BF16: bfloat16 autocast on CPU)"
    logger.warning(
        "SOLVER.AMP.ENABLED is set but MODEL.DEVICE is %r (CUDA available: %s): %s",
        cfg.MODEL.DEVICE,
        torch.cuda.is_available(),
        outcome,
    )
    return False


def cpu_has_native_bf16():
    """Whether this CPU computes bfloat16 natively: AVX512-BF16 or AMX on x86 (elsewhere, what
    oneDNN reports). Without it oneDNN emulates bfloat16, which is not faster than float32."""
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
            return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without these queries: not detected
        return False


def cpu_bf16_enabled(cfg):
    """Whether to train under CPU autocast with bfloat16: ``SOLVER.AMP.CPU_BF16``, the model on
    the CPU and a CPU with native bfloat16 (:func:`cpu_has_native_bf16`). Logs a warning when it
    is requested but not used."""
    if not cfg.SOLVER.AMP.get("CPU_BF16", False):
        return False
    if torch.device(cfg.MODEL.DEVICE).type != "cpu":
        reason = f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} (SOLVER.AMP.ENABLED chooses CUDA AMP)"
    elif not cpu_has_native_bf16():
        reason = (
            "no native bfloat16 (AVX512-BF16 or AMX) was detected on this CPU, where it would be "
            "slower"
        )
    else:
        return True
    logger.warning("SOLVER.AMP.CPU_BF16 is set but %s: training in float32", reason)
    return False


class _ReleaseGradientsAfterStep:
    """
    Drops the gradients (``zero_grad(set_to_none=True)``) right after each iteration's optimizer
    step. detectron2's trainers zero them only between the next forward pass and backward, so one
    copy of the gradients (4 bytes per parameter: 165 MB for MaskFormer R50) sits unused in memory
    during every forward pass, when activation memory peaks. Nothing reads gradients after the
    step; detectron2 main's ``zero_grad_before_forward=True`` has the same effect.
    """

    def run_step(self):
        super().run_step()
        self.optimizer.zero_grad(set_to_none=True)


class LeanSimpleTrainer(_ReleaseGradientsAfterStep, SimpleTrainer):
    """detectron2's ``SimpleTrainer`` that frees the gradients after the optimizer step."""


class LeanAMPTrainer(_ReleaseGradientsAfterStep, AMPTrainer):
    """detectron2's ``AMPTrainer`` that frees the gradients after the optimizer step, and that
    resumes from a checkpoint written without AMP (e.g. a run started on CPU, where AMP is
    skipped): its trainer state has no grad-scaler state, and the scaler then starts afresh."""

    def load_state_dict(self, state_dict):
        if "grad_scaler" in state_dict:
            super().load_state_dict(state_dict)
            return
        logger.warning(
            "The checkpoint's trainer state has no AMP grad-scaler state (it was saved without "
            "AMP); the grad scaler starts afresh"
        )
        SimpleTrainer.load_state_dict(self, state_dict)


class CPUAutocastTrainer(SimpleTrainer):
    """detectron2's ``SimpleTrainer`` whose forward pass (model and losses) runs under
    ``torch.autocast("cpu", dtype=torch.bfloat16)``, as ``AMPTrainer`` does on CUDA: the backward
    pass and the optimizer step run outside autocast, parameters, gradients and optimizer state
    stay float32, and bfloat16 needs no loss scaling. The criterion, the matcher and Mask2Former's
    pixel decoder compute in float32 under autocast, as they do under CUDA AMP. The options of
    detectron2 main's ``SimpleTrainer`` (``zero_grad_before_forward``, ``async_write_metrics``)
    are honoured where that version has them."""

    def run_step(self):
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        zero_grad_first = getattr(self, "zero_grad_before_forward", False)
        if zero_grad_first:
            self.optimizer.zero_grad()
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())

        if not zero_grad_first:
            self.optimizer.zero_grad()
        losses.backward()
        after_backward = getattr(self, "after_backward", None)  # detectron2 main's hook point
        if after_backward is not None:
            after_backward()
        if getattr(self, "async_write_metrics", False):
            self.concurrent_executor.submit(
                self._write_metrics, loss_dict, data_time, iter=self.iter
            )
        else:
            self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


class LeanCPUAutocastTrainer(_ReleaseGradientsAfterStep, CPUAutocastTrainer):
    """:class:`CPUAutocastTrainer` that frees the gradients after the optimizer step."""


def build_step_trainer(cfg, model, data_loader, optimizer):
    """The object running one iteration: detectron2's ``AMPTrainer`` when :func:`amp_enabled`,
    :class:`LeanCPUAutocastTrainer` when :func:`cpu_bf16_enabled`, otherwise ``SimpleTrainer``,
    all freeing the gradients after each optimizer step."""
    if amp_enabled(cfg):
        trainer_type = LeanAMPTrainer
    elif cpu_bf16_enabled(cfg):
        trainer_type = LeanCPUAutocastTrainer
    else:
        trainer_type = LeanSimpleTrainer
    return trainer_type(model, data_loader, optimizer)
