"""When a CPU-only fast path of an op may replace its plain PyTorch formulation."""

import torch
from torch import Tensor

__all__ = ["cpu_inference_fast_path"]


def cpu_inference_fast_path(x: Tensor) -> bool:
    """Whether ``x`` is on the CPU, no gradient is recorded for it and no trace is running.

    The fast paths guarded by this write into preallocated or reused buffers (``out=`` or in-place
    ops), which autograd cannot follow, and would hide their ops from a tracer (fvcore's FLOP
    count) that expects the plain formulation.
    """
    return (
        x.device.type == "cpu"
        and not torch.jit.is_tracing()
        and not (torch.is_grad_enabled() and x.requires_grad)
    )
