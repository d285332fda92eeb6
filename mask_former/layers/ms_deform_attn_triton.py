"""Fused multi-scale deformable attention core in Triton (forward and backward, no build step).

Computes exactly what ``ms_deform_attn_core_pytorch`` computes (bilinear sampling with zero
padding and ``align_corners=False``, then the attention-weighted sum over levels and points) in one
kernel, without materialising the [N*M, D, Lq, L*P] samples. The backward recomputes the samples
and accumulates the value gradient with atomics (its summation order is therefore not fixed).

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
imported (slow; meant for tests). Importing this module raises ImportError without triton.

Shape legend:
    N: batch size
    Lq: number of queries
    S: number of flattened input positions over all levels, sum_l H_l * W_l
    M: number of attention heads
    D: channels per head
    L: number of feature levels
    P: number of sampling points per head and level

Kernel blocks: a program handles ``BLOCK_Q`` rows of the flattened (n, q) axis for one head and
all ``D`` channels (padded to ``BLOCK_D``, a power of 2).
"""

import contextlib
import logging

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .ms_deform_attn import _check_core_inputs, _shape_list

__all__ = ["ms_deform_attn_triton"]

logger = logging.getLogger(__name__)

# Elements of a [BLOCK_Q, BLOCK_D] tile per program; the backward holds more tiles at once.
_FORWARD_TILE = 2048
_BACKWARD_TILE = 1024
_NUM_WARPS = 4


@triton.jit
def _bilinear_setup(x, y, width, height):
    """Pixel-space corner and weights of normalised (x, y), as grid_sample(align_corners=False).

    Returns the float top-left corner (x0, y0) and the weights along x (wx0 for column x0, wx1 for
    column x0 + 1) and along y (wy0, wy1).
    """
    # grid_sample maps g = 2 * loc - 1 in [-1, 1] to ((g + 1) * size - 1) / 2
    ix = ((x * 2 - 1 + 1) * width - 1) * 0.5
    iy = ((y * 2 - 1 + 1) * height - 1) * 0.5
    x0 = tl.floor(ix)
    y0 = tl.floor(iy)
    return x0, y0, (x0 + 1) - ix, ix - x0, (y0 + 1) - iy, iy - y0


@triton.jit
def _corner_offsets(x0, y0, width, height, level_base, num_heads, head, head_dim):
    """Element offsets of the value rows at the four corners and whether each is inside.

    Args (per row of the block): x0, y0 float top-left corner; width, height the level size;
    level_base the int64 index in [N*S] of the level's first position for the row's batch item.
    Returns offsets (int64, of channel 0) and masks for the corners nw, ne, sw, se.
    """
    widthf = width.to(x0.dtype)
    heightf = height.to(x0.dtype)
    in_x0 = (x0 >= 0) & (x0 <= widthf - 1)
    in_x1 = (x0 >= -1) & (x0 <= widthf - 2)
    in_y0 = (y0 >= 0) & (y0 <= heightf - 1)
    in_y1 = (y0 >= -1) & (y0 <= heightf - 2)
    # Clamped before the integer cast so that far-away (or huge) coordinates cannot overflow.
    xi = tl.minimum(tl.maximum(x0, -1.0), widthf).to(tl.int64)
    yi = tl.minimum(tl.maximum(y0, -1.0), heightf).to(tl.int64)
    nw = ((level_base + yi * width + xi) * num_heads + head) * head_dim
    right = num_heads * head_dim
    down = width * right
    return (
        nw,
        nw + right,
        nw + down,
        nw + down + right,
        in_x0 & in_y0,
        in_x1 & in_y0,
        in_x0 & in_y1,
        in_x1 & in_y1,
    )


@triton.jit
def _ms_deform_attn_forward_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    out_ptr,
    num_rows,
    num_queries,
    num_keys,
    num_heads,
    head_dim,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    head = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    row_mask = rows < num_rows
    batch = rows // num_queries
    channels = tl.arange(0, BLOCK_D)
    channel_mask = channels < head_dim
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=COMPUTE_DTYPE)
    for level in tl.static_range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        level_base = batch * num_keys + tl.load(starts_ptr + level)
        for point in tl.static_range(NUM_POINTS):
            # index into [N*Lq, M, L, P]
            idx = (rows * num_heads + head) * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            x = tl.load(loc_ptr + 2 * idx, mask=row_mask, other=0.0).to(COMPUTE_DTYPE)
            y = tl.load(loc_ptr + 2 * idx + 1, mask=row_mask, other=0.0).to(COMPUTE_DTYPE)
            weight = tl.load(attn_ptr + idx, mask=row_mask, other=0.0).to(COMPUTE_DTYPE)
            x0, y0, wx0, wx1, wy0, wy1 = _bilinear_setup(
                x, y, width.to(COMPUTE_DTYPE), height.to(COMPUTE_DTYPE)
            )
            o_nw, o_ne, o_sw, o_se, m_nw, m_ne, m_sw, m_se = _corner_offsets(
                x0, y0, width, height, level_base, num_heads, head, head_dim
            )
            cols = channels[None, :]
            m_nw = (m_nw & row_mask)[:, None] & channel_mask[None, :]
            m_ne = (m_ne & row_mask)[:, None] & channel_mask[None, :]
            m_sw = (m_sw & row_mask)[:, None] & channel_mask[None, :]
            m_se = (m_se & row_mask)[:, None] & channel_mask[None, :]
            v_nw = tl.load(value_ptr + o_nw[:, None] + cols, mask=m_nw, other=0.0)
            v_ne = tl.load(value_ptr + o_ne[:, None] + cols, mask=m_ne, other=0.0)
            v_sw = tl.load(value_ptr + o_sw[:, None] + cols, mask=m_sw, other=0.0)
            v_se = tl.load(value_ptr + o_se[:, None] + cols, mask=m_se, other=0.0)
            sample = (
                v_nw.to(COMPUTE_DTYPE) * (wx0 * wy0)[:, None]
                + v_ne.to(COMPUTE_DTYPE) * (wx1 * wy0)[:, None]
                + v_sw.to(COMPUTE_DTYPE) * (wx0 * wy1)[:, None]
                + v_se.to(COMPUTE_DTYPE) * (wx1 * wy1)[:, None]
            )
            acc += sample * weight[:, None]
    out_offsets = (rows * num_heads + head)[:, None] * head_dim + channels[None, :]
    tl.store(out_ptr + out_offsets, acc, mask=row_mask[:, None] & channel_mask[None, :])


@triton.jit
def _ms_deform_attn_backward_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    grad_out_ptr,
    grad_value_ptr,
    grad_loc_ptr,
    grad_attn_ptr,
    num_rows,
    num_queries,
    num_keys,
    num_heads,
    head_dim,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    head = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    row_mask = rows < num_rows
    batch = rows // num_queries
    channels = tl.arange(0, BLOCK_D)
    channel_mask = channels < head_dim
    cols = channels[None, :]
    tile_mask = row_mask[:, None] & channel_mask[None, :]
    out_offsets = (rows * num_heads + head)[:, None] * head_dim + cols
    grad_out = tl.load(grad_out_ptr + out_offsets, mask=tile_mask, other=0.0).to(COMPUTE_DTYPE)
    for level in tl.static_range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        level_base = batch * num_keys + tl.load(starts_ptr + level)
        for point in tl.static_range(NUM_POINTS):
            idx = (rows * num_heads + head) * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            x = tl.load(loc_ptr + 2 * idx, mask=row_mask, other=0.0).to(COMPUTE_DTYPE)
            y = tl.load(loc_ptr + 2 * idx + 1, mask=row_mask, other=0.0).to(COMPUTE_DTYPE)
            weight = tl.load(attn_ptr + idx, mask=row_mask, other=0.0).to(COMPUTE_DTYPE)
            widthf = width.to(COMPUTE_DTYPE)
            heightf = height.to(COMPUTE_DTYPE)
            x0, y0, wx0, wx1, wy0, wy1 = _bilinear_setup(x, y, widthf, heightf)
            o_nw, o_ne, o_sw, o_se, m_nw, m_ne, m_sw, m_se = _corner_offsets(
                x0, y0, width, height, level_base, num_heads, head, head_dim
            )
            m_nw = (m_nw & row_mask)[:, None] & channel_mask[None, :]
            m_ne = (m_ne & row_mask)[:, None] & channel_mask[None, :]
            m_sw = (m_sw & row_mask)[:, None] & channel_mask[None, :]
            m_se = (m_se & row_mask)[:, None] & channel_mask[None, :]
            v_nw = tl.load(value_ptr + o_nw[:, None] + cols, mask=m_nw, other=0.0)
            v_ne = tl.load(value_ptr + o_ne[:, None] + cols, mask=m_ne, other=0.0)
            v_sw = tl.load(value_ptr + o_sw[:, None] + cols, mask=m_sw, other=0.0)
            v_se = tl.load(value_ptr + o_se[:, None] + cols, mask=m_se, other=0.0)
            v_nw = v_nw.to(COMPUTE_DTYPE)
            v_ne = v_ne.to(COMPUTE_DTYPE)
            v_sw = v_sw.to(COMPUTE_DTYPE)
            v_se = v_se.to(COMPUTE_DTYPE)
            sample = (
                v_nw * (wx0 * wy0)[:, None]
                + v_ne * (wx1 * wy0)[:, None]
                + v_sw * (wx0 * wy1)[:, None]
                + v_se * (wx1 * wy1)[:, None]
            )
            tl.store(grad_attn_ptr + idx, tl.sum(grad_out * sample, axis=1), mask=row_mask)
            # d sample / d ix and d ix / d x = width (ix = x * width - 0.5); likewise for y.
            d_ix = (v_ne - v_nw) * wy0[:, None] + (v_se - v_sw) * wy1[:, None]
            d_iy = (v_sw - v_nw) * wx0[:, None] + (v_se - v_ne) * wx1[:, None]
            grad_x = tl.sum(grad_out * d_ix, axis=1) * weight * widthf
            grad_y = tl.sum(grad_out * d_iy, axis=1) * weight * heightf
            tl.store(grad_loc_ptr + 2 * idx, grad_x, mask=row_mask)
            tl.store(grad_loc_ptr + 2 * idx + 1, grad_y, mask=row_mask)
            grad_sample = grad_out * weight[:, None]
            grad_nw = grad_sample * (wx0 * wy0)[:, None]
            grad_ne = grad_sample * (wx1 * wy0)[:, None]
            grad_sw = grad_sample * (wx0 * wy1)[:, None]
            grad_se = grad_sample * (wx1 * wy1)[:, None]
            tl.atomic_add(grad_value_ptr + o_nw[:, None] + cols, grad_nw, mask=m_nw)
            tl.atomic_add(grad_value_ptr + o_ne[:, None] + cols, grad_ne, mask=m_ne)
            tl.atomic_add(grad_value_ptr + o_sw[:, None] + cols, grad_sw, mask=m_sw)
            tl.atomic_add(grad_value_ptr + o_se[:, None] + cols, grad_se, mask=m_se)


def _launch_config(num_rows: int, head_dim: int, tile: int):
    """Returns (BLOCK_Q, BLOCK_D): channels padded to a power of 2, rows filling ``tile``."""
    block_d = triton.next_power_of_2(head_dim)
    block_q = max(1, min(tile // block_d, triton.next_power_of_2(num_rows)))
    return block_q, block_d


def _on_device_of(tensor: Tensor):
    """Makes the tensor's GPU the current one: triton launches on the current device, whatever
    device the pointers belong to. A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _compute_dtype(value: Tensor):
    """float64 inputs are computed in float64, everything else in float32."""
    return tl.float64 if value.dtype == torch.float64 else tl.float32


def _launch(kernel, tile, value, locations, *tensors):
    """Launches ``kernel`` on the GPU of ``value`` over the flattened (n, q) rows and the heads.

    ``tensors`` are the kernel's tensor arguments after ``value``; the sizes and the block
    configuration follow them as the two kernels expect.
    """
    n, num_keys, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = locations.shape
    num_rows = n * num_queries
    block_q, block_d = _launch_config(num_rows, head_dim, tile)
    grid = (triton.cdiv(num_rows, block_q), num_heads)
    with _on_device_of(value):
        kernel[grid](
            value,
            *tensors,
            num_rows,
            num_queries,
            num_keys,
            num_heads,
            head_dim,
            NUM_LEVELS=num_levels,
            NUM_POINTS=num_points,
            BLOCK_Q=block_q,
            BLOCK_D=block_d,
            COMPUTE_DTYPE=_compute_dtype(value),
            num_warps=_NUM_WARPS,
        )


class _MSDeformAttnTritonFunction(torch.autograd.Function):
    """Autograd wrapper of the two kernels; inputs are contiguous and validated by the caller."""

    @staticmethod
    def forward(
        ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ):
        n, _, num_heads, head_dim = value.shape
        output = value.new_empty(n, sampling_locations.shape[1], num_heads * head_dim)
        _launch(
            _ms_deform_attn_forward_kernel,
            _FORWARD_TILE,
            value,
            sampling_locations,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            output,
        )
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, locations, weights = ctx.saved_tensors
        compute = torch.float64 if value.dtype == torch.float64 else torch.float32
        # Accumulated in the compute dtype (atomics in half precision would lose too much).
        grad_value = torch.zeros(value.shape, dtype=compute, device=value.device)
        grad_loc = torch.empty(locations.shape, dtype=compute, device=value.device)
        grad_attn = torch.empty(weights.shape, dtype=compute, device=value.device)
        _launch(
            _ms_deform_attn_backward_kernel,
            _BACKWARD_TILE,
            value,
            locations,
            spatial_shapes,
            level_start_index,
            locations,
            weights,
            grad_output.contiguous(),
            grad_value,
            grad_loc,
            grad_attn,
        )
        return (
            grad_value.to(value.dtype),
            None,
            None,
            grad_loc.to(locations.dtype),
            grad_attn.to(weights.dtype),
        )


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Fused equivalent of ``ms_deform_attn_core_pytorch`` (differentiable in all three tensors).

    Args:
        value (Tensor): [N, S, M, D] per-head values of all levels, flattened level by level.
        spatial_shapes (Tensor or sequence): [L, 2] (H_l, W_l) of each level, int.
        sampling_locations (Tensor): [N, Lq, M, L, P, 2] normalised (x, y) sampling points.
        attention_weights (Tensor): [N, Lq, M, L, P] weights.

    Returns:
        Tensor: [N, Lq, M * D] in the dtype of ``value`` (computed in float32, float64 for
        float64 inputs).

    Raises:
        ValueError: if the input shapes are inconsistent.
    """
    _check_core_inputs(value, _shape_list(spatial_shapes), sampling_locations, attention_weights)
    shapes = torch.as_tensor(spatial_shapes, dtype=torch.int64, device=value.device).contiguous()
    sizes = shapes[:, 0] * shapes[:, 1]
    level_start_index = torch.cumsum(sizes, 0) - sizes
    return _MSDeformAttnTritonFunction.apply(
        value.contiguous(),
        shapes,
        level_start_index,
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )
