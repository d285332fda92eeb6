"""Multi-scale deformable attention: the pure-PyTorch core, the MSDeformAttn module and the Triton
kernel (through triton's CPU interpreter here, on CUDA where a GPU exists)."""

import json
import logging
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO

from mask_former.layers import (
    MSDeformAttn,
    ms_deform_attn_core_gather,
    ms_deform_attn_core_pytorch,
)
from mask_former.layers import ms_deform_attn as msda_module

# Several levels, non-square ones and a 1x1 one.
SHAPES = [[5, 7], [3, 2], [1, 1], [2, 4]]
LOGGER_NAME = "mask_former.layers.ms_deform_attn"


def _random_inputs(n, lq, m, d, shapes, p, dtype=torch.float32, spread=0.2, device="cpu"):
    """Random value [N,S,M,D], locations [N,Lq,M,L,P,2] in [-spread, 1+spread], weights."""
    s = sum(h * w for h, w in shapes)
    num_levels = len(shapes)
    value = torch.randn(n, s, m, d, dtype=dtype, device=device)
    locations = torch.rand(n, lq, m, num_levels, p, 2, dtype=dtype, device=device)
    locations = locations * (1 + 2 * spread) - spread
    weights = torch.rand(n, lq, m, num_levels, p, dtype=dtype, device=device)
    weights = weights.flatten(-2).softmax(-1).view(n, lq, m, num_levels, p)
    return value, torch.tensor(shapes, device=device), locations, weights


def _naive_core(value, shapes, locations, weights):
    """Bilinear sampling point by point: pixel i spans [i, i+1) with its centre at i + 0.5 in
    units of the level size, and positions outside the level read zeros."""
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = locations.shape
    out = torch.zeros(n, lq, m, d, dtype=value.dtype)
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for level, (h, w) in enumerate(shapes):
                    for point in range(num_points):
                        x = float(locations[b, q, head, level, point, 0]) * w - 0.5
                        y = float(locations[b, q, head, level, point, 1]) * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        corners = [
                            (x0, y0, (x0 + 1 - x) * (y0 + 1 - y)),
                            (x0 + 1, y0, (x - x0) * (y0 + 1 - y)),
                            (x0, y0 + 1, (x0 + 1 - x) * (y - y0)),
                            (x0 + 1, y0 + 1, (x - x0) * (y - y0)),
                        ]
                        attn = float(weights[b, q, head, level, point])
                        for xi, yi, bilinear in corners:
                            if 0 <= xi < w and 0 <= yi < h:
                                row = value[b, starts[level] + yi * w + xi, head]
                                out[b, q, head] += attn * bilinear * row
    return out.view(n, lq, m * d)


# --------------------------------------------------------------------------------------------
# The pure-PyTorch cores: grid_sample ("pytorch") and embedding_bag ("gather")

CORES = {"pytorch": ms_deform_attn_core_pytorch, "gather": ms_deform_attn_core_gather}
each_core = pytest.mark.parametrize("core", list(CORES.values()), ids=list(CORES))


@each_core
def test_core_matches_naive_bilinear(core):
    value, shapes, locations, weights = _random_inputs(
        1, 3, 2, 3, [[3, 4], [2, 1]], 2, dtype=torch.float64, spread=0.3
    )
    expected = _naive_core(value, shapes.tolist(), locations, weights)
    out = core(value, shapes, locations, weights)
    assert out.shape == (1, 3, 6)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@each_core
def test_core_at_pixel_centres_reads_pixels(core):
    value = torch.arange(12.0).view(1, 12, 1, 1)  # one 3x4 level, value = flat index
    # (x, y) at the centres of pixels (col 2, row 1) and (col 0, row 2)
    locations = torch.tensor([[2.5 / 4, 1.5 / 3], [0.5 / 4, 2.5 / 3]]).view(1, 2, 1, 1, 1, 2)
    weights = torch.ones(1, 2, 1, 1, 1)
    out = core(value, [[3, 4]], locations, weights)
    torch.testing.assert_close(out.flatten(), torch.tensor([6.0, 8.0]))


@each_core
def test_core_gradcheck_double(core):
    value, shapes, locations, weights = _random_inputs(
        2, 3, 2, 3, [[3, 4], [2, 1], [1, 1]], 2, dtype=torch.float64
    )
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(lambda v, loc, a: core(v, shapes, loc, a), inputs)


@pytest.mark.parametrize("chunk_queries", [None, 1, 3, 7, 1000])
def test_core_chunked_inference_equals_autograd_path(chunk_queries):
    value, shapes, locations, weights = _random_inputs(2, 23, 4, 8, SHAPES, 4)
    with torch.no_grad():
        chunked = ms_deform_attn_core_pytorch(value, shapes, locations, weights, chunk_queries)
    reference = ms_deform_attn_core_pytorch(value.requires_grad_(), shapes, locations, weights)
    assert torch.equal(chunked, reference.detach())  # bit-identical, not merely close


@each_core
def test_core_outside_locations_contribute_nothing(core):
    value, shapes, locations, weights = _random_inputs(2, 6, 2, 4, SHAPES, 3)
    # Fully outside: more than half a pixel beyond any edge of every level (x or y).
    outside = torch.rand(locations.shape[:-1]) < 0.5
    far = torch.tensor([-0.6, 1.6])[torch.randint(0, 2, locations.shape[:-1])]
    axis = torch.randint(0, 2, locations.shape[:-1])
    moved = locations.clone()
    moved[..., 0] = torch.where(outside & (axis == 0), far, locations[..., 0])
    moved[..., 1] = torch.where(outside & (axis == 1), far, locations[..., 1])
    out = core(value, shapes, moved, weights)
    expected = core(value, shapes, moved, weights * ~outside)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    all_out = torch.full_like(locations, 1.6)
    assert torch.equal(core(value, shapes, all_out, weights), torch.zeros(2, 6, 8))


@each_core
def test_core_spatial_shapes_as_list_or_tensor(core):
    value, shapes, locations, weights = _random_inputs(1, 4, 2, 4, SHAPES, 2)
    assert torch.equal(
        core(value, shapes, locations, weights),
        core(value, shapes.tolist(), locations, weights),
    )


@each_core
def test_core_bad_shapes_raise(core):
    value, shapes, locations, weights = _random_inputs(1, 4, 2, 4, SHAPES, 2)
    with pytest.raises(ValueError, match="cover"):
        core(value[:, :-1], shapes, locations, weights)
    with pytest.raises(ValueError, match="value must be"):
        core(value.flatten(2), shapes, locations, weights)
    with pytest.raises(ValueError, match="sampling_locations"):
        core(value, shapes, locations[:, :, :1], weights)
    with pytest.raises(ValueError, match="last dim 3"):
        core(value, shapes, torch.cat([locations] * 2, -1)[..., :3], weights)
    with pytest.raises(ValueError, match="attention_weights"):
        core(value, shapes, locations, weights[..., :1])
    if core is ms_deform_attn_core_pytorch:
        with torch.no_grad(), pytest.raises(ValueError, match="chunk_queries"):
            core(value, shapes, locations, weights, chunk_queries=0)


def test_gather_core_agrees_with_grid_sample_core_in_float32():
    """Values and all three gradients, at a realistic size with points inside and outside."""
    torch.manual_seed(0)
    shapes = [[16, 16], [8, 8], [4, 4]]
    value, shapes, locations, weights = _random_inputs(2, 300, 8, 32, shapes, 4, spread=0.1)
    results = {}
    for name, core in CORES.items():
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        out = core(inputs[0], shapes, inputs[1], inputs[2])
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        results[name] = [out.detach()] + [t.grad for t in inputs]
    for gather, reference in zip(results["gather"], results["pytorch"]):
        scale = reference.abs().max()
        torch.testing.assert_close(gather, reference, rtol=0, atol=2e-6 * scale)


def test_gather_core_integer_row_indices_for_large_tables(monkeypatch):
    """Past 2**24 table rows the row indices are not exact in float32 and are summed as int64:
    the same result (forced here by lowering the limit)."""
    value, shapes, locations, weights = _random_inputs(2, 9, 3, 4, SHAPES, 3)
    float_rows = ms_deform_attn_core_gather(value, shapes, locations, weights)
    monkeypatch.setattr(msda_module, "_FLOAT_EXACT_ROWS", 1)
    int_rows = ms_deform_attn_core_gather(value, shapes, locations, weights)
    assert torch.equal(float_rows, int_rows)


def test_gather_core_reads_the_right_rows_of_a_level_beyond_float32_integers():
    """A 4100 x 4100 level has more than 2**24 positions: float32 cannot count its rows, so the
    row indices are summed in int64 (values here: flat index mod 1000, read at pixel centres)."""
    h = w = 4100
    value = (torch.arange(h * w) % 1000).float().view(1, h * w, 1, 1)
    pixels = torch.tensor([[4098, 4099], [100, 4099], [4099, 0], [7, 3]])  # (x, y)
    locations = ((pixels.double() + 0.5) / torch.tensor([w, h])).float().view(1, 4, 1, 1, 1, 2)
    weights = torch.ones(1, 4, 1, 1, 1)
    out = ms_deform_attn_core_gather(value, [[h, w]], locations, weights).flatten()
    expected = ((pixels[:, 1] * w + pixels[:, 0]) % 1000).float()
    assert torch.equal(out, expected)


def test_gather_core_has_no_double_backward():
    value, shapes, locations, weights = _random_inputs(1, 4, 2, 4, SHAPES, 2, dtype=torch.float64)
    value.requires_grad_()
    locations.requires_grad_()
    out = ms_deform_attn_core_gather(value, shapes, locations, weights)
    # d out / d locations depends on the values: a graph of it would have to go through the
    # gather's backward, which records none; it raises instead of returning a partial graph
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.sum(), locations, create_graph=True)
    (grad,) = torch.autograd.grad(out.sum(), locations)  # first order is fine
    assert torch.isfinite(grad).all()


def test_gather_core_non_finite_locations_read_zeros():
    """A NaN or infinite location reads the zero frame (it never indexes outside the table)."""
    value, shapes, locations, weights = _random_inputs(1, 4, 2, 4, SHAPES, 2)
    bad = locations.clone()
    bad[0, 0, 0, :, :, 0] = float("nan")
    bad[0, 1, 1, :, :, 1] = float("inf")
    bad[0, 2, 0, :, :, 0] = -float("inf")
    out = ms_deform_attn_core_gather(value, shapes, bad, weights).view(1, 4, 2, 4)
    assert torch.isfinite(out).all()
    for q, head in ((0, 0), (1, 1), (2, 0)):
        assert torch.equal(out[0, q, head], torch.zeros(4))
    expected = ms_deform_attn_core_gather(value, shapes, locations, weights).view(1, 4, 2, 4)
    torch.testing.assert_close(out[0, 3], expected[0, 3])


# --------------------------------------------------------------------------------------------
# The module


def test_module_init():
    attn = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
    directions = torch.tensor(
        [[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32
    )
    scale = torch.arange(1, 5, dtype=torch.float32).view(1, 1, 4, 1)
    expected = directions.view(8, 1, 1, 2) * scale
    bias = attn.sampling_offsets.bias.detach().view(8, 4, 4, 2)
    torch.testing.assert_close(bias, expected.expand(8, 4, 4, 2), atol=1e-5, rtol=0)
    assert bias[0, 2, 3].tolist() == [4.0, 0.0]  # head 0 points along +x exactly
    for zero in (
        attn.sampling_offsets.weight,
        attn.attention_weights.weight,
        attn.attention_weights.bias,
        attn.value_proj.bias,
        attn.output_proj.bias,
    ):
        assert torch.count_nonzero(zero) == 0
    bound = math.sqrt(6.0 / (256 + 256))  # xavier_uniform
    for proj in (attn.value_proj, attn.output_proj):
        assert proj.weight.abs().max() <= bound
        assert proj.weight.std() > 0.5 * bound / math.sqrt(3)


def test_module_state_dict_order():
    keys = list(MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=4).state_dict())
    assert keys == [
        f"{name}.{kind}"
        for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
        for kind in ("weight", "bias")
    ]


def _pixel_setup(head_offsets):
    """A module that copies its input (identity projections) and attends uniformly (zero
    attention logits); its heads add fixed offsets ``head_offsets[m] = (dx, dy)``.

    Returns (module, input_flatten [1,S,4], spatial_shapes [2,2], start index [2], pixels): two
    queries, each with a (col, row) pixel per level (same for both levels' points).
    """
    shapes = torch.tensor([[3, 4], [2, 5]])
    module = MSDeformAttn(d_model=4, n_levels=2, n_heads=2, n_points=2, impl="pytorch")
    with torch.no_grad():
        for proj in (module.value_proj, module.output_proj):
            proj.weight.copy_(torch.eye(4))
        bias = torch.tensor(head_offsets, dtype=torch.float32).view(2, 1, 1, 2)
        module.sampling_offsets.bias.copy_(bias.expand(2, 2, 2, 2).reshape(-1))
    input_flatten = torch.randn(1, 22, 4)
    pixels = [[(1, 0), (2, 1)], [(0, 2), (3, 0)]]  # [query][level] -> (col, row)
    return module, input_flatten, shapes, torch.tensor([0, 12]), pixels


def _expected_from_pixels(input_flatten, pixels, head_offsets, masked=()):
    """Mean over the two levels of the pixel values, moved per head by whole pixels (zero where
    that leaves the level or the position is ``masked``)."""
    sizes, starts = [(3, 4), (2, 5)], [0, 12]
    out = torch.zeros(1, len(pixels), 4)
    for q, per_level in enumerate(pixels):
        for level, (col, row) in enumerate(per_level):
            height, width = sizes[level]
            for head, (dx, dy) in enumerate(head_offsets):
                index = starts[level] + (row + dy) * width + col + dx
                if col + dx < width and row + dy < height and index not in masked:
                    channels = slice(2 * head, 2 * head + 2)
                    out[0, q, channels] += 0.5 * input_flatten[0, index, channels]
    return out


def _centres(pixels, shapes):
    """Normalised (x, y) of the pixel centres, [1, Lq, L, 2]."""
    return torch.tensor(
        [
            [[(col + 0.5) / int(w), (row + 0.5) / int(h)] for (col, row), (h, w) in zip(q, shapes)]
            for q in pixels
        ]
    )[None]


@pytest.mark.parametrize("head_offsets", [[(0, 0), (0, 0)], [(1, 0), (0, 1)]])
def test_module_point_references_offsets_in_pixels(head_offsets):
    module, inputs, shapes, starts, pixels = _pixel_setup(head_offsets)
    query = torch.randn(1, 2, 4)
    out = module(query, _centres(pixels, shapes), inputs, shapes, starts)
    torch.testing.assert_close(
        out, _expected_from_pixels(inputs, pixels, head_offsets), atol=1e-6, rtol=1e-6
    )


def test_module_box_references():
    head_offsets = [(1, 0), (0, 1)]
    module, inputs, shapes, starts, pixels = _pixel_setup(head_offsets)
    with torch.no_grad():  # box offsets move by offset / P * size / 2: P = 2 gives size / 2
        module.sampling_offsets.bias.mul_(2)
    centres = _centres(pixels, shapes)
    sizes = (2.0 / shapes.flip(-1).float()).expand_as(centres)  # two pixels wide and high
    boxes = torch.cat([centres, sizes], -1)
    out = module(torch.randn(1, 2, 4), boxes, inputs, shapes, starts)
    torch.testing.assert_close(
        out, _expected_from_pixels(inputs, pixels, head_offsets), atol=1e-6, rtol=1e-6
    )


def test_module_padding_mask_zeroes_values():
    module, inputs, shapes, starts, pixels = _pixel_setup([(0, 0), (0, 0)])
    mask = torch.zeros(1, 22, dtype=torch.bool)
    masked = (0 * 4 + 1, 12 + 0 * 5 + 3)  # query 0's level-0 pixel and query 1's level-1 pixel
    mask[0, list(masked)] = True
    centres = _centres(pixels, shapes)
    out = module(torch.randn(1, 2, 4), centres, inputs, shapes, starts, mask)
    expected = _expected_from_pixels(inputs, pixels, [(0, 0), (0, 0)], masked)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    # everything padded: only the output projection's bias is left, even with a value bias
    with torch.no_grad():
        module.value_proj.bias.fill_(3.0)
        module.output_proj.bias.copy_(torch.tensor([1.0, -2.0, 0.5, 4.0]))
    out = module(torch.randn(1, 2, 4), centres, inputs, shapes, starts, torch.ones_like(mask))
    assert torch.equal(out, module.output_proj.bias.detach().expand(1, 2, 4))


def test_module_bad_inputs_raise():
    module = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)
    shapes = torch.tensor([[3, 4], [2, 5]])
    query, ref = torch.randn(1, 3, 8), torch.rand(1, 3, 2, 2)
    starts = torch.tensor([0, 12])
    with pytest.raises(ValueError, match="S=21"):
        module(query, ref, torch.randn(1, 21, 8), shapes, starts)
    with pytest.raises(ValueError, match="last dim 3"):
        module(query, torch.rand(1, 3, 2, 3), torch.randn(1, 22, 8), shapes, starts)
    with pytest.raises(ValueError, match="expected 2 levels"):
        module(query, ref, torch.randn(1, 12, 8), shapes[:1], starts[:1])
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="impl"):
        MSDeformAttn(d_model=8, n_heads=2, impl="cuda")


def test_module_backward_reaches_every_parameter():
    module = MSDeformAttn(d_model=16, n_levels=4, n_heads=2, n_points=3)
    shapes = torch.tensor(SHAPES)
    out = module(
        torch.randn(2, 5, 16), torch.rand(2, 5, 4, 2), torch.randn(2, 50, 16), shapes, None
    )
    out.square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name


def test_module_logs_choice_once_and_warns(caplog, monkeypatch):
    monkeypatch.setattr(msda_module, "_LOGGED_CHOICES", set())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    module = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=1)
    args = (torch.randn(1, 2, 8), torch.rand(1, 2, 1, 2), torch.randn(1, 6, 8))
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        for _ in range(3):
            module(*args, torch.tensor([[2, 3]]), torch.tensor([0]))
        module.impl = "triton"
        with pytest.raises(RuntimeError, match="triton"):
            module(*args, torch.tensor([[2, 3]]), torch.tensor([0]))
        MSDeformAttn(d_model=24, n_heads=2)
    choices = [r.getMessage() for r in caplog.records if "implementation" in r.getMessage()]
    assert choices == [
        "MSDeformAttn uses the pytorch implementation: tensors on cpu, the Triton "
        "kernel needs CUDA"
    ]
    assert any("not a power of 2" in r.getMessage() for r in caplog.records)


def module_with_triton_core(monkeypatch, core):
    """A small "auto" module whose Triton core is ``core`` (on CPU: as under the interpreter),
    with a fresh record of where the kernel worked or failed; returns it and its inputs."""
    monkeypatch.setattr(msda_module, "_TRITON_WORKS", set())
    monkeypatch.setattr(msda_module, "_TRITON_FAILED", {})
    monkeypatch.setattr(msda_module, "_import_triton_impl", lambda: (core, None))
    monkeypatch.setattr(msda_module, "_triton_interpreter_on", lambda: True)
    module = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=1)
    args = (torch.randn(1, 2, 8), torch.rand(1, 2, 1, 2), torch.randn(1, 6, 8))
    return module, args, (torch.tensor([[2, 3]]), torch.tensor([0]))


def test_auto_falls_back_when_the_triton_kernel_cannot_launch(caplog, monkeypatch):
    # E.g. no host C compiler for triton's launcher (slim images): "auto" warns and runs the
    # grid_sample core for that device and dtype from then on; impl="triton" would raise.
    calls = []

    def broken_core(*args):
        calls.append(args)
        raise RuntimeError("Failed to find C compiler. Please specify via CC")

    module, args, shapes = module_with_triton_core(monkeypatch, broken_core)
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        outputs = [module(*args, *shapes) for _ in range(3)]
    assert len(calls) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Failed to find C compiler" in warnings[0]
    module.impl = "pytorch"
    expected = module(*args, *shapes)
    for output in outputs:
        assert torch.equal(output, expected)
    module.impl = "triton"
    with pytest.raises(RuntimeError, match="C compiler"):
        module(*args, *shapes)


def test_auto_triton_errors_after_a_first_success_and_out_of_memory_propagate(monkeypatch):
    outcomes = [None, RuntimeError("illegal memory access")]

    def flaky_core(value, spatial_shapes, sampling_locations, attention_weights):
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        return msda_module.ms_deform_attn_core_pytorch(
            value, spatial_shapes, sampling_locations, attention_weights
        )

    module, args, shapes = module_with_triton_core(monkeypatch, flaky_core)
    module(*args, *shapes)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        module(*args, *shapes)
    monkeypatch.setattr(msda_module, "_TRITON_WORKS", set())
    outcomes.append(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        module(*args, *shapes)
    assert not msda_module._TRITON_FAILED


# --------------------------------------------------------------------------------------------
# Triton: the interpreter on CPU (in a subprocess, since TRITON_INTERPRET is read when triton
# is imported)

_INTERPRETER_SCRIPT = textwrap.dedent("""
    import json
    import sys

    import torch
    import triton
    import triton.language as tl


    @triton.jit
    def _probe(x_ptr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.atomic_add(x_ptr + offsets, tl.floor(tl.load(x_ptr + offsets)))


    probe = torch.full((4,), 1.5)
    try:
        _probe[(1,)](probe, BLOCK=4)
    except Exception as error:  # any failure of the interpreter itself means "cannot test here"
        print(json.dumps({"skip": f"triton {triton.__version__} interpreter: {error!r}"}))
        sys.exit(0)
    if not torch.equal(probe, torch.full((4,), 2.5)):
        print(json.dumps({"skip": f"triton {triton.__version__} interpreter: wrong probe result"}))
        sys.exit(0)

    from mask_former.layers import MSDeformAttn, ms_deform_attn_core_pytorch
    from mask_former.layers.ms_deform_attn_triton import ms_deform_attn_triton

    torch.manual_seed(0)
    shapes = torch.tensor(SHAPES)
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    n, lq, m, d, num_levels, p = 2, 9, 2, 6, len(SHAPES), 3
    value = torch.randn(n, s, m, d, requires_grad=True)
    locations = (torch.rand(n, lq, m, num_levels, p, 2) * 1.4 - 0.2).requires_grad_()
    weights = torch.rand(n, lq, m, num_levels, p).softmax(-1).requires_grad_()
    inputs = (value, locations, weights)
    fused = ms_deform_attn_triton(value, shapes, locations, weights)
    pure = ms_deform_attn_core_pytorch(value, shapes, locations, weights)
    grad_out = torch.randn_like(pure)
    fused_grads = torch.autograd.grad(fused, inputs, grad_out)
    pure_grads = torch.autograd.grad(pure, inputs, grad_out)
    result = {"forward": (fused - pure).abs().max().item()}
    for name, a, b in zip(("value", "locations", "weights"), fused_grads, pure_grads):
        result["grad_" + name] = (a - b).abs().max().item()

    small = [t.detach()[:1, :2, :, :2].double() for t in (value, locations, weights)]
    small[0] = value.detach()[:1, :41].double()  # levels 0 and 1 only
    result["gradcheck_double"] = torch.autograd.gradcheck(
        lambda v, loc, a: ms_deform_attn_triton(v, shapes[:2], loc, a),
        [t.requires_grad_() for t in small],
        fast_mode=True,
        raise_exception=False,
    )

    module = MSDeformAttn(d_model=12, n_levels=num_levels, n_heads=2, n_points=p, impl="triton")
    args = (torch.randn(n, lq, 12), torch.rand(n, lq, num_levels, 2), torch.randn(n, s, 12))
    starts = torch.cumsum(shapes.prod(1), 0) - shapes.prod(1)
    fused = module(*args, shapes, starts)
    module.impl = "pytorch"
    result["module_forward"] = (fused - module(*args, shapes, starts)).abs().max().item()
    print(json.dumps(result))
    """)


@pytest.fixture(scope="module")
def interpreter_result(tmp_path_factory):
    """Runs ``_INTERPRETER_SCRIPT`` under TRITON_INTERPRET=1 and returns its JSON result."""
    pytest.importorskip("triton", reason="triton is not installed")
    script = tmp_path_factory.mktemp("triton_interpreter") / "check.py"
    script.write_text(f"SHAPES = {SHAPES!r}\n" + _INTERPRETER_SCRIPT)
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    logging.getLogger(__name__).info("Triton interpreter vs PyTorch: %s", result)
    return result


def test_triton_interpreter_forward_matches_pytorch(interpreter_result):
    assert interpreter_result["forward"] < 1e-5
    assert interpreter_result["module_forward"] < 1e-5


def test_triton_interpreter_backward_matches_pytorch(interpreter_result):
    assert interpreter_result["grad_value"] < 1e-5
    assert interpreter_result["grad_locations"] < 1e-4  # scaled by the level sizes
    assert interpreter_result["grad_weights"] < 1e-5
    assert interpreter_result["gradcheck_double"] is True


# --------------------------------------------------------------------------------------------
# Triton on CUDA

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA_CASES = [
    # (N, Lq, M, D, level shapes, P)
    (2, 300, 8, 32, [[32, 48], [16, 24], [8, 12], [1, 1]], 4),
    (1, 77, 4, 24, [[7, 3], [1, 1], [5, 9]], 3),
    (3, 5, 2, 64, [[1, 1], [2, 1]], 1),
]


@cuda_only
@pytest.mark.parametrize("case", CUDA_CASES)
def test_triton_cuda_matches_pytorch(case):
    pytest.importorskip("triton", reason="triton is not installed")
    from mask_former.layers.ms_deform_attn_triton import ms_deform_attn_triton

    n, lq, m, d, shapes, p = case
    value, shapes, locations, weights = _random_inputs(n, lq, m, d, shapes, p, device="cuda")
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    fused = ms_deform_attn_triton(value, shapes, locations, weights)
    pure = ms_deform_attn_core_pytorch(value, shapes, locations, weights)
    torch.testing.assert_close(fused, pure, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(pure)
    fused_grads = torch.autograd.grad(fused, inputs, grad_out)
    pure_grads = torch.autograd.grad(pure, inputs, grad_out)
    for fused_grad, pure_grad in zip(fused_grads, pure_grads):
        torch.testing.assert_close(fused_grad, pure_grad, atol=1e-4, rtol=1e-4)


@cuda_only
def test_triton_cuda_gradcheck_double():
    pytest.importorskip("triton", reason="triton is not installed")
    from mask_former.layers.ms_deform_attn_triton import ms_deform_attn_triton

    value, shapes, locations, weights = _random_inputs(
        1, 4, 2, 3, [[3, 2], [1, 1]], 2, dtype=torch.float64, device="cuda"
    )
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(
        lambda v, loc, a: ms_deform_attn_triton(v, shapes, loc, a), inputs
    )


@cuda_only
def test_module_auto_uses_triton_on_cuda(caplog, monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setattr(msda_module, "_LOGGED_CHOICES", set())
    module = MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=4).cuda()
    shapes = torch.tensor(SHAPES, device="cuda")
    args = (
        torch.randn(2, 50, 32, device="cuda"),
        torch.rand(2, 50, 4, 2, device="cuda"),
        torch.randn(2, 50, 32, device="cuda"),
    )
    starts = torch.cumsum(shapes.prod(1), 0) - shapes.prod(1)
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        fused = module(*args, shapes, starts)
    assert any("triton implementation" in r.getMessage() for r in caplog.records)
    module.impl = "pytorch"
    torch.testing.assert_close(fused, module(*args, shapes, starts), atol=1e-5, rtol=1e-5)


@cuda_only
def test_triton_cuda_half_precision():
    pytest.importorskip("triton", reason="triton is not installed")
    from mask_former.layers.ms_deform_attn_triton import ms_deform_attn_triton

    value, shapes, locations, weights = _random_inputs(2, 64, 4, 32, SHAPES, 4, device="cuda")
    half = [t.half() for t in (value, locations, weights)]
    fused = ms_deform_attn_triton(half[0], shapes, half[1], half[2])
    assert fused.dtype == torch.float16
    pure = ms_deform_attn_core_pytorch(half[0].float(), shapes, half[1].float(), half[2].float())
    torch.testing.assert_close(fused.float(), pure.float(), atol=2e-3, rtol=2e-3)


def test_inference_softmax_equals_softmax():
    logits = torch.randn(3, 50, 8, 12) * 4
    logits[0, 0, 0, :5] = -float("inf")  # masked entries get weight 0, as in softmax
    with torch.no_grad():
        out = msda_module._softmax_last_dim(logits)
    expected = torch.softmax(logits, -1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(out[0, 0, 0, :5], torch.zeros(5))
    tracked = msda_module._softmax_last_dim(logits.clone().requires_grad_())
    assert tracked.grad_fn is not None and torch.equal(tracked.detach(), expected)


@pytest.mark.parametrize("needs", ["value", "locations", "weights"])
def test_gather_core_backward_of_one_input(needs):
    """The gather's own backward (index_add_ scatter, row dot products) for each input alone
    equals embedding_bag's autograd backward (chunking: test_gather_core_backward_chunks)."""
    value, shapes, locations, weights = _random_inputs(2, 37, 3, 4, SHAPES, 3, dtype=torch.float64)
    inputs = {"value": value, "locations": locations, "weights": weights}
    inputs[needs] = inputs[needs].clone().requires_grad_()
    out = ms_deform_attn_core_gather(
        inputs["value"], shapes, inputs["locations"], inputs["weights"]
    )
    grad_out = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, inputs[needs], grad_out)

    def embedding_bag_apply(table, index, corner_weights):
        return torch.nn.functional.embedding_bag(
            index, table, per_sample_weights=corner_weights, mode="sum"
        )

    original = msda_module._WeightedGather.apply
    msda_module._WeightedGather.apply = embedding_bag_apply
    try:
        out_ref = ms_deform_attn_core_gather(
            inputs["value"], shapes, inputs["locations"], inputs["weights"]
        )
        (reference,) = torch.autograd.grad(out_ref, inputs[needs], grad_out)
    finally:
        msda_module._WeightedGather.apply = original
    assert torch.equal(out, out_ref)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def test_gather_core_backward_chunks(monkeypatch):
    value, shapes, locations, weights = _random_inputs(1, 11, 2, 4, SHAPES, 2, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    out = ms_deform_attn_core_gather(inputs[0], shapes, inputs[1], inputs[2])
    grads = torch.autograd.grad(out.sum(), inputs)
    monkeypatch.setattr(msda_module._WeightedGather, "CHUNK_ROWS", 3)  # 22 rows: 8 chunks
    out = ms_deform_attn_core_gather(inputs[0], shapes, inputs[1], inputs[2])
    for a, b in zip(grads, torch.autograd.grad(out.sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
