"""Multi-scale deformable attention (Deformable DETR), the attention of Mask2Former's pixel decoder.

Each query attends, per head, to ``P`` points on each of ``L`` feature levels. The points are its
reference point plus learned offsets; the value there is read by bilinear interpolation and the
``L * P`` samples are summed with softmax-normalised learned weights.

Three implementations of the sampling-and-summing core are provided:

* ``ms_deform_attn_core_pytorch``: ``F.grid_sample`` per level, numerically the reference path
  (the golden files were recorded with it). Runs anywhere.
* ``ms_deform_attn_core_gather``: one ``F.embedding_bag`` weighted gather of the four bilinear
  corners of every sample from a zero-framed value table. The same values up to float rounding;
  about 3x faster on CPU (forward). Opt-in (``impl="gather"``): its rounding differences can flip
  thresholded mask pixels, so the default keeps the published arithmetic. Runs anywhere.
* ``ms_deform_attn_triton`` (``ms_deform_attn_triton.py``): one fused Triton kernel for forward and
  backward, no build step. Used on CUDA when triton imports.

Shape legend:
    N: batch size
    Lq: number of queries
    S: number of flattened input positions over all levels, sum_l H_l * W_l
    C: model width (``d_model``)
    M: number of attention heads
    D: channels per head, C / M
    L: number of feature levels
    P: number of sampling points per head and level
    H_l, W_l: height and width of level l

Sampling locations are (x, y) in [0, 1] relative to a level's extent, with 0 and 1 at the outer
edges of the first and last pixel (``align_corners=False``). Samples outside the level read zeros.
"""

import functools
import logging
import math
import os
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fast_path import cpu_inference_fast_path

__all__ = [
    "MSDeformAttn",
    "ms_deform_attn_core_pytorch",
    "ms_deform_attn_core_gather",
    "IMPLEMENTATIONS",
]

logger = logging.getLogger(__name__)

# Values accepted by ``MSDeformAttn(impl=...)``.
IMPLEMENTATIONS = ("auto", "pytorch", "gather", "triton")

# Without autograd the PyTorch core works on chunks of queries whose product buffer
# [N*M, D, q, L, P] takes about this many bytes (small enough to stay in cache and in the heap).
_CHUNK_BYTES = 4 << 20

# Row indices of the gather core up to this many table rows are computed in floating point
# (float32 represents every integer up to 2**24 exactly); larger tables use int64 arithmetic.
_FLOAT_EXACT_ROWS = 2**24

# Decisions already logged by ``_select_impl`` (each one is logged once per process).
_LOGGED_CHOICES = set()
# (device, dtype) where the Triton kernel has run, or failed on its first launch ("auto").
_TRITON_WORKS = set()
_TRITON_FAILED = {}


def _shape_list(spatial_shapes: Union[Tensor, Sequence[Sequence[int]]]) -> List[List[int]]:
    """Returns ``[[H_l, W_l], ...]`` as Python ints from a [L, 2] tensor or a nested sequence."""
    if isinstance(spatial_shapes, Tensor):
        return [[int(h), int(w)] for h, w in spatial_shapes.tolist()]
    return [[int(h), int(w)] for h, w in spatial_shapes]


def _check_core_inputs(value, shapes, sampling_locations, attention_weights):
    """Raises ValueError unless the core's four inputs have consistent shapes."""
    if value.dim() != 4:
        raise ValueError(f"value must be [N, S, M, D], got shape {tuple(value.shape)}")
    n, s, m, _ = value.shape
    total = sum(h * w for h, w in shapes)
    if total != s:
        raise ValueError(f"spatial_shapes {shapes} cover {total} positions, but value has S={s}")
    num_levels = len(shapes)
    loc_shape = tuple(sampling_locations.shape)
    if len(loc_shape) != 6 or loc_shape[0] != n or loc_shape[2:4] != (m, num_levels):
        raise ValueError(
            f"sampling_locations must be [N={n}, Lq, M={m}, L={num_levels}, P, 2], got {loc_shape}"
        )
    if loc_shape[5] != 2:
        raise ValueError(f"sampling_locations must end in (x, y), got last dim {loc_shape[5]}")
    if tuple(attention_weights.shape) != loc_shape[:5]:
        raise ValueError(
            f"attention_weights must be {loc_shape[:5]} (sampling_locations without the last "
            f"dim), got {tuple(attention_weights.shape)}"
        )


def ms_deform_attn_core_pytorch(
    value: Tensor,
    spatial_shapes: Union[Tensor, Sequence[Sequence[int]]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    chunk_queries: Optional[int] = None,
) -> Tensor:
    """Samples every level bilinearly and sums the samples with the attention weights.

    Numerically the reference formulation: per level ``F.grid_sample(value_l, 2 * loc - 1,
    bilinear, zeros, align_corners=False)``, the samples stacked over levels and points, multiplied
    by the weights and summed over the last dim. Without autograd the same elementwise operations
    and the same reduction run over chunks of queries with reused buffers: identical values, about
    2.5x faster on CPU (the full-size temporaries are not page-faulted in at every call).

    Args:
        value (Tensor): [N, S, M, D] per-head values of all levels, flattened level by level.
        spatial_shapes (Tensor or sequence): [L, 2] (H_l, W_l) of each level, int.
        sampling_locations (Tensor): [N, Lq, M, L, P, 2] normalised (x, y) sampling points.
        attention_weights (Tensor): [N, Lq, M, L, P] weights (softmax over L * P in the module).
        chunk_queries (int or None): queries per chunk without autograd; None picks a size whose
            buffers stay around ``_CHUNK_BYTES``.

    Returns:
        Tensor: [N, Lq, M * D] attended values, head-major channels.

    Raises:
        ValueError: if the input shapes are inconsistent or ``chunk_queries`` < 1.
    """
    shapes = _shape_list(spatial_shapes)
    _check_core_inputs(value, shapes, sampling_locations, attention_weights)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (value, sampling_locations, attention_weights)
    )
    n, _, m, d = value.shape
    # [N, H_l*W_l, M, D] -> [N*M, D, H_l, W_l]
    value_per_level = [
        value_l.flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        for value_l, (h, w) in zip(value.split([h * w for h, w in shapes], dim=1), shapes)
    ]
    if needs_grad:
        # [N*M, D, Lq] -> [N, Lq, M*D]
        output = _sample_and_sum(value_per_level, sampling_locations, attention_weights)
        return output.view(n, m * d, -1).transpose(1, 2).contiguous()
    return _sample_and_sum_chunked(
        value_per_level, sampling_locations, attention_weights, chunk_queries
    )


def _sample_and_sum(value_per_level, sampling_locations, attention_weights):
    """The reference sequence of differentiable ops.

    Args:
        value_per_level (list[Tensor]): L tensors [N*M, D, H_l, W_l].
        sampling_locations (Tensor): [N, Lq, M, L, P, 2].
        attention_weights (Tensor): [N, Lq, M, L, P].

    Returns:
        Tensor: [N*M, D, Lq].
    """
    n, lq, m, num_levels, num_points, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1  # grid_sample addresses [-1, 1]
    samples = []
    for level, value_l in enumerate(value_per_level):
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # [N*M, D, Lq, P]
        samples.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    # [N, Lq, M, L, P] -> [N*M, 1, Lq, L*P], broadcast over D
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    # [N*M, D, Lq, L*P] -> [N*M, D, Lq]
    return (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)


def _chunk_size(value: Tensor, num_queries: int, row_elements: int, requested: Optional[int]):
    """Queries per chunk: ``requested``, else on CPU as many as fit ``_CHUNK_BYTES`` of products
    (``row_elements`` per query) and elsewhere all of them (no page faults to avoid there).

    Raises:
        ValueError: if ``requested`` < 1.
    """
    if requested is None:
        if value.device.type != "cpu":
            requested = num_queries
        else:
            requested = _CHUNK_BYTES // (row_elements * value.element_size())
    elif requested < 1:
        raise ValueError(f"chunk_queries must be positive, got {requested}")
    return max(1, min(requested, num_queries))


def _sample_and_sum_chunked(value_per_level, sampling_locations, attention_weights, chunk_queries):
    """``_sample_and_sum`` without autograd, over chunks of queries, with identical values.

    Every element of every intermediate is computed by the same kernel from the same operands as
    in ``_sample_and_sum``: grid_sample's samples are independent per grid point and the final
    reduction runs over the same contiguous rows of L*P products.

    Args:
        value_per_level (list[Tensor]): L tensors [N*M, D, H_l, W_l].
        sampling_locations (Tensor): [N, Lq, M, L, P, 2].
        attention_weights (Tensor): [N, Lq, M, L, P].
        chunk_queries (int or None): queries per chunk (None: automatic).

    Returns:
        Tensor: [N, Lq, M*D].
    """
    n, lq, m, num_levels, num_points, _ = sampling_locations.shape
    d = value_per_level[0].shape[1]
    chunk_queries = _chunk_size(
        value_per_level[0], lq, n * m * d * num_levels * num_points, chunk_queries
    )
    dtype = torch.promote_types(value_per_level[0].dtype, attention_weights.dtype)
    output = value_per_level[0].new_empty(n, lq, m, d, dtype=dtype)
    # Reused buffers: grids [L, N, M, q, P, 2] and products [N*M, D, q, L, P].
    grid_buffer = sampling_locations.new_empty(num_levels, n, m, chunk_queries, num_points, 2)
    product_buffer = output.new_empty(n * m, d, chunk_queries, num_levels, num_points)
    # [N, Lq, M, L, P] -> [N*M, 1, Lq, L, P], broadcast over D
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels, num_points)
    for start in range(0, lq, chunk_queries):
        stop = min(start + chunk_queries, lq)
        grids = grid_buffer[:, :, :, : stop - start]
        # [N, q, M, L, P, 2] -> [L, N, M, q, P, 2]; computes 2 * loc - 1 as the reference does
        torch.mul(sampling_locations[:, start:stop].permute(3, 0, 2, 1, 4, 5), 2, out=grids)
        grids.sub_(1)
        products = product_buffer[:, :, : stop - start]
        for level, value_l in enumerate(value_per_level):
            # [N*M, D, q, P]
            sample_l = F.grid_sample(
                value_l,
                grids[level].flatten(0, 1),
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )
            torch.mul(sample_l, weights[:, :, start:stop, level], out=products[:, :, :, level])
        # [N*M, D, q] -> [N, q, M, D]
        summed = products.flatten(-2).sum(-1).view(n, m, d, stop - start)
        output[:, start:stop].copy_(summed.permute(0, 3, 1, 2))
    return output.view(n, lq, m * d)


def _padded_value_table(value: Tensor, shapes: List[List[int]]):
    """Lays the values out as rows of D channels, each level framed by zeros.

    Every level becomes a (H_l + 3) x (W_l + 3) grid: one row/column of zeros before the level and
    two after, so that all four bilinear corners of any point whose pixel coordinates are clamped to
    [-1, W_l] x [-1, H_l] are rows of the table, the ones outside the level reading zeros.

    Args:
        value (Tensor): [N, S, M, D].
        shapes (list[list[int]]): [[H_l, W_l], ...].

    Returns:
        tuple: the table [N * M * S_pad, D] (rows ordered by batch, head, level, y, x) and
        ``S_pad`` = sum over levels of (H_l + 3) * (W_l + 3).
    """
    n, _, m, d = value.shape
    sizes = [(h + 3) * (w + 3) for h, w in shapes]
    table = value.new_zeros(n, m, sum(sizes), d)
    start, padded_start = 0, 0
    for (h, w), padded in zip(shapes, sizes):
        # [N, H*W, M, D] -> [N, M, H, W, D] inside the frame (narrow: a single view, which
        # autograd lets us write into)
        frame = table.narrow(2, padded_start, padded).view(n, m, h + 3, w + 3, d)
        frame[:, :, 1 : h + 1, 1 : w + 1] = (
            value.narrow(1, start, h * w).view(n, h, w, m, d).permute(0, 3, 1, 2, 4)
        )
        start, padded_start = start + h * w, padded_start + padded
    return table.view(-1, d), padded_start


def _per_sample_constants(shapes: List[List[int]], num_points: int, like: Tensor):
    """Per (level, point) constants of the gather core, each [L*P, ...] (point index fastest).

    Returns:
        size (Tensor): [L*P, 2] (W_l, H_l) in ``like``'s dtype.
        row_length (Tensor): [L*P] W_l + 3, the padded row length.
        first_row (Tensor): [L*P] table row of pixel (x, y) = (-1, -1) plus W_l + 4, so that
            ``first_row + y * row_length + x`` is the row of pixel (x, y).
        corners (Tensor): [L*P, 4] row offsets of the corners (x0, y0), (x0 + 1, y0), (x0, y0 + 1),
            (x0 + 1, y0 + 1) from (x0, y0), in ``like``'s dtype.
    """
    start, sizes, row_lengths, first_rows, corners = 0, [], [], [], []
    for h, w in shapes:
        sizes.append([w, h])
        row_lengths.append(w + 3)
        first_rows.append(start + w + 4)
        corners.append([0, 1, w + 3, w + 4])
        start += (h + 3) * (w + 3)

    def per_point(values):
        t = like.new_tensor(values)
        return t[:, None].expand(t.shape[0], num_points, *t.shape[1:]).flatten(0, 1).contiguous()

    return per_point(sizes), per_point(row_lengths), per_point(first_rows), per_point(corners)


def ms_deform_attn_core_gather(
    value: Tensor,
    spatial_shapes: Union[Tensor, Sequence[Sequence[int]]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The core as one weighted gather: ``F.embedding_bag`` over the four bilinear corners.

    Each (batch, query, head) output is a weighted sum of L * P * 4 rows of a zero-framed value
    table, the weights being attention weight x bilinear weight. It computes what
    ``ms_deform_attn_core_pytorch`` computes (same zero padding, ``align_corners=False``) with the
    sums in another order, so results agree to float rounding (about 1e-6 relative in float32;
    exactly in the tests' float64 cases). It is differentiable in all three inputs (the sampling
    locations through the bilinear weights, as ``grid_sample``) and several times faster on CPU: no
    per-channel interpolation, no [.., D, Lq, L*P] products.

    Args and returns: as :func:`ms_deform_attn_core_pytorch` (no chunking argument).

    Raises:
        ValueError: if the input shapes are inconsistent.
    """
    shapes = _shape_list(spatial_shapes)
    _check_core_inputs(value, shapes, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    rows, samples = n * lq * m, num_levels * num_points
    table, padded_positions = _padded_value_table(value, shapes)
    # Index arithmetic in float32 at least (half precision cannot count table rows).
    locations = sampling_locations.to(torch.promote_types(value.dtype, torch.float32))
    size, row_length, first_row, corners = _per_sample_constants(shapes, num_points, locations)
    # Pixel coordinates (grid_sample's unnormalisation), clamped to the frame; a NaN coordinate
    # becomes -1 and reads zeros instead of indexing outside the table.
    xy = (locations.reshape(rows, samples, 2) * size - 0.5).nan_to_num(nan=-1.0)
    xy = torch.clamp(xy, min=xy.new_tensor(-1.0), max=size)
    xy0 = xy.floor()
    frac = xy - xy0
    x0, y0 = xy0.unbind(-1)
    # [N*Lq*M, L*P] row of corner (x0, y0), plus the (batch, head) block's offset: in floating
    # point while every row index is exact there, else in int64.
    exact_in_float = n * m * padded_positions <= _FLOAT_EXACT_ROWS
    dtype = locations.dtype if exact_in_float else torch.int64
    block_offset = torch.arange(n * m, device=value.device).view(n, 1, m, 1) * padded_positions
    first = x0.to(dtype) + first_row.to(dtype) + y0.to(dtype) * row_length.to(dtype)
    first = (first.view(n, lq, m, samples) + block_offset.to(dtype)).view(rows, samples)
    index = (first.unsqueeze(-1) + corners.to(dtype)).to(torch.int64)
    fx, fy = frac.unbind(-1)
    weights = attention_weights.reshape(rows, samples).to(frac.dtype)
    weights_y1 = weights * fy
    weights_y0 = weights - weights_y1
    weights_x1y0 = weights_y0 * fx
    weights_x1y1 = weights_y1 * fx
    corner_weights = torch.stack(
        [weights_y0 - weights_x1y0, weights_x1y0, weights_y1 - weights_x1y1, weights_x1y1], -1
    )
    output = _WeightedGather.apply(
        table,
        index.view(rows, samples * 4),
        corner_weights.view(rows, samples * 4).to(table.dtype),
    )
    return output.view(n, lq, m * d)


class _WeightedGather(torch.autograd.Function):
    """``out[r] = sum_j weights[r, j] * table[index[r, j]]``: ``F.embedding_bag`` (mode "sum")
    forward; a backward that scatters into the table with ``index_add_`` over chunks of rows,
    about twice as fast on CPU as embedding_bag's own (which sorts all indices first). No double
    backward: with ``create_graph=True`` it raises."""

    # Rows per chunk of the backward's [rows, J, D] products (~6 MB for J = 48, D = 32).
    CHUNK_ROWS = 1024

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(table, index, weights)
        return F.embedding_bag(index, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: this backward records no graph
            raise RuntimeError(
                "ms_deform_attn_core_gather has no double backward (create_graph=True); use "
                "the grid_sample core (impl='pytorch') for higher-order gradients"
            )
        table, index, weights = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        grad_table = torch.zeros_like(table) if ctx.needs_input_grad[0] else None
        grad_weights = torch.empty_like(weights) if ctx.needs_input_grad[2] else None
        for start in range(0, index.shape[0], _WeightedGather.CHUNK_ROWS):
            stop = min(start + _WeightedGather.CHUNK_ROWS, index.shape[0])
            chunk_index, chunk_grad = index[start:stop], grad_output[start:stop]
            if grad_table is not None:
                # [c, J, D] contributions to the rows they were read from
                products = weights[start:stop, :, None] * chunk_grad[:, None, :]
                grad_table.index_add_(0, chunk_index.flatten(), products.flatten(0, 1))
            if grad_weights is not None:
                # [c, J, D] @ [c, D, 1]: each weight's gradient is its row . grad_output
                rows = table.index_select(0, chunk_index.flatten()).view(*chunk_index.shape, -1)
                torch.bmm(rows, chunk_grad[:, :, None], out=grad_weights[start:stop, :, None])
        return grad_table, None, grad_weights


def _softmax_last_dim(x: Tensor) -> Tensor:
    """``F.softmax(x, -1)``. Without autograd on CPU it runs as max, exp and sum ops: over a short
    last dim (L * P = 12 here) several times faster than softmax's own kernel, equal up to float
    rounding (about 1e-7)."""
    if not cpu_inference_fast_path(x):
        return F.softmax(x, -1)
    exp = (x - x.amax(-1, keepdim=True)).exp_()
    return exp.div_(exp.sum(-1, keepdim=True))


def _triton_interpreter_on() -> bool:
    """Whether triton runs kernels on the CPU (``TRITON_INTERPRET=1``, read when triton imports)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _import_triton_impl():
    """Returns ``(ms_deform_attn_triton, None)``, or ``(None, ImportError)`` if triton is missing.

    Imported on first use only: CPU runs never import (nor need) the kernel module.
    """
    try:
        from .ms_deform_attn_triton import ms_deform_attn_triton
    except ImportError as error:
        return None, error
    return ms_deform_attn_triton, None


def _log_choice_once(impl: str, reason: str):
    """Logs (at INFO, once per process and decision) which core runs and why."""
    if (impl, reason) not in _LOGGED_CHOICES:
        _LOGGED_CHOICES.add((impl, reason))
        logger.info("MSDeformAttn uses the %s implementation: %s", impl, reason)


def _select_impl(impl: str, value: Tensor):
    """Picks the core function for ``impl`` and these inputs.

    "auto" picks Triton where it runs (CUDA tensors, or its CPU interpreter) and imports, and the
    grid_sample core otherwise: the published arithmetic. The gather core is faster on CPU but
    rounds differently, so it runs only when asked for.

    Args:
        impl (str): the requested implementation.
        value (Tensor): [N, S, M, D] values; their device decides "auto".

    Returns:
        callable: a core with the signature of ``ms_deform_attn_core_pytorch``.

    Raises:
        ValueError: for an unknown ``impl``.
        RuntimeError: for "triton" when triton cannot run on these tensors.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "pytorch":
        _log_choice_once("pytorch", "requested (impl='pytorch')")
        return ms_deform_attn_core_pytorch
    if impl == "gather":
        _log_choice_once("gather", "requested (impl='gather')")
        return ms_deform_attn_core_gather
    runs_triton = value.is_cuda or _triton_interpreter_on()
    if impl == "auto" and not runs_triton:
        _log_choice_once("pytorch", f"tensors on {value.device.type}, the Triton kernel needs CUDA")
        return ms_deform_attn_core_pytorch
    triton_core, error = _import_triton_impl()
    if impl == "auto":
        if triton_core is None:
            _log_choice_once("pytorch", f"triton is not importable ({error!r})")
            return ms_deform_attn_core_pytorch
        if (value.device, value.dtype) in _TRITON_FAILED:
            return ms_deform_attn_core_pytorch
        _log_choice_once("triton", f"tensors on {value.device.type} and triton imports")
        return functools.partial(_triton_or_fallback, triton_core)
    if triton_core is None:
        raise RuntimeError(f"impl='triton' but triton is not importable: {error!r}") from error
    if not runs_triton:
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {value.device}"
        )
    _log_choice_once("triton", f"requested (impl='triton'), tensors on {value.device.type}")
    return triton_core


def _triton_or_fallback(triton_core, value, spatial_shapes, sampling_locations, attention_weights):
    """The Triton core for "auto"; if its first launch for a device and dtype fails (triton builds
    each kernel's launcher with a host C compiler, which slim images lack; or no driver, an
    unsupported GPU, ...), logs a warning and runs the grid_sample core for that device and dtype
    from then on. Once a launch succeeded, errors propagate. Out-of-memory errors always do."""
    key = (value.device, value.dtype)
    args = (value, spatial_shapes, sampling_locations, attention_weights)
    if key in _TRITON_WORKS:
        return triton_core(*args)
    try:
        output = triton_core(*args)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:
        _TRITON_FAILED[key] = error
        logger.warning(
            "MSDeformAttn: the Triton kernel failed on its first launch on %s (%s); using the "
            "grid_sample implementation there from now on (same results, slower; pass "
            "impl='triton' to see the error raised)",
            value.device,
            f"{type(error).__name__}: {error}",
        )
        return ms_deform_attn_core_pytorch(*args)
    _TRITON_WORKS.add(key)
    return output


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the published parameter names and initialisation.

    Parameters are registered as ``sampling_offsets``, ``attention_weights``, ``value_proj`` and
    ``output_proj`` (in this order, as in published checkpoints).
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        impl: str = "auto",
    ):
        """
        Args:
            d_model (int): model width C.
            n_levels (int): number of feature levels L.
            n_heads (int): number of attention heads M; must divide ``d_model``.
            n_points (int): sampling points P per head and level.
            impl (str): "auto" (Triton on CUDA when triton imports, else the grid_sample core),
                "pytorch" (grid_sample), "gather" or "triton". May be changed later through the
                ``impl`` attribute.

        Raises:
            ValueError: if ``d_model`` is not divisible by ``n_heads`` or ``impl`` is unknown.
        """
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
        head_dim = d_model // n_heads
        if head_dim & (head_dim - 1) != 0:
            logger.warning(
                "MSDeformAttn: d_model / n_heads = %d is not a power of 2, which the fused "
                "kernels handle less efficiently (padded channel blocks).",
                head_dim,
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.impl = impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _initial_offsets(self) -> Tensor:
        """Returns the [M, L, P, 2] initial offset bias: per head a unit direction on the square
        (angle 2*pi*h/M, divided by its larger |component|), times (point index + 1)."""
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        offsets = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        for point in range(self.n_points):
            offsets[:, :, point, :] *= point + 1
        return offsets

    def _reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(self._initial_offsets().view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def _sampling_locations(
        self, reference_points: Tensor, offsets: Tensor, spatial_shapes: Tensor
    ) -> Tensor:
        """Adds the offsets to the reference points.

        Args:
            reference_points (Tensor): [N, Lq, L, 2] normalised (x, y) points, or [N, Lq, L, 4]
                normalised boxes (cx, cy, w, h).
            offsets (Tensor): [N, Lq, M, L, P, 2] predicted offsets, in pixels of each level for
                points and in units of P / (half the box size) for boxes.
            spatial_shapes (Tensor): [L, 2] (H_l, W_l).

        Returns:
            Tensor: [N, Lq, M, L, P, 2] normalised (x, y) sampling locations.

        Raises:
            ValueError: if the last dim of ``reference_points`` is neither 2 nor 4.
        """
        if reference_points.shape[-1] == 2:
            # reference + offsets / (W_l, H_l), elementwise as published; the per-level constants
            # are laid out over the contiguous (L, P, 2) block so both broadcasts are cheap.
            n, lq, m, num_levels, num_points, _ = offsets.shape
            block = num_levels * num_points * 2
            offset_normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            offset_normalizer = offset_normalizer.to(offsets.dtype)[:, None]
            offset_normalizer = offset_normalizer.expand(num_levels, num_points, 2).reshape(block)
            references = reference_points[:, :, None, :, None, :].expand(
                n, lq, 1, num_levels, num_points, 2
            )
            scaled = offsets.reshape(n, lq, m, block) / offset_normalizer
            return (references.reshape(n, lq, 1, block) + scaled).view(offsets.shape)
        if reference_points.shape[-1] == 4:
            return (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        raise ValueError(
            "reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), got last dim "
            f"{reference_points.shape[-1]}"
        )

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query (Tensor): [N, Lq, C] queries (with their positional embedding added).
            reference_points (Tensor): [N, Lq, L, 2] normalised (x, y) in [0, 1], (0, 0) the
                top-left corner, or [N, Lq, L, 4] normalised boxes (cx, cy, w, h).
            input_flatten (Tensor): [N, S, C] the levels' features, flattened and concatenated.
            input_spatial_shapes (Tensor): [L, 2] int64 (H_l, W_l).
            input_level_start_index (Tensor): [L] int64 start of each level in S. Kept for the
                published signature; both cores derive the starts from ``input_spatial_shapes``.
            input_padding_mask (Tensor or None): [N, S] bool, True at padded positions (their
                values are zeroed).

        Returns:
            Tensor: [N, Lq, C].

        Raises:
            ValueError: if the shapes are inconsistent.
        """
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        total = int((input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum())
        if total != s:
            raise ValueError(
                f"input_spatial_shapes cover {total} positions, but input_flatten has S={s}"
            )
        if input_spatial_shapes.shape[0] != self.n_levels:
            raise ValueError(
                f"expected {self.n_levels} levels, got input_spatial_shapes of shape "
                f"{tuple(input_spatial_shapes.shape)}"
            )
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(
            n, lq, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(
            n, lq, self.n_heads, self.n_levels * self.n_points
        )
        core = _select_impl(self.impl, value)
        # "pytorch" keeps the published arithmetic end to end (softmax's own kernel)
        if core is ms_deform_attn_core_pytorch:
            weights = F.softmax(weights, -1)
        else:
            weights = _softmax_last_dim(weights)
        weights = weights.view(n, lq, self.n_heads, self.n_levels, self.n_points)
        locations = self._sampling_locations(reference_points, offsets, input_spatial_shapes)
        output = core(value, input_spatial_shapes, locations, weights)
        return self.output_proj(output)
