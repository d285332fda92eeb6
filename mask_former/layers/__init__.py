"""Ops with optional fused kernels: multi-scale deformable attention.

The Triton kernel lives in ``ms_deform_attn_triton`` and is imported on first use on CUDA only.
"""

from .ms_deform_attn import MSDeformAttn, ms_deform_attn_core_gather, ms_deform_attn_core_pytorch

__all__ = ["MSDeformAttn", "ms_deform_attn_core_pytorch", "ms_deform_attn_core_gather"]
