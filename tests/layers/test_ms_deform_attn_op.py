"""The compiled multi-scale deformable attention op against its grid_sample reference, on CPU (CUDA where present)."""

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable, List, Optional, Sequence, Tuple

import pytest
import torch
from torch import Tensor, nn

import sparse_detr
from sparse_detr.layers import ms_deform_attn, ms_deform_attn_available, ms_deform_attn_op, ms_deform_attn_pytorch

requires_op = pytest.mark.skipif(not ms_deform_attn_available(), reason="sparse_detr._C is not built")
requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and ms_deform_attn_available() and sparse_detr._C.compiled_with_cuda()),
    reason="needs a GPU and the CUDA kernels",
)

Inputs = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def make_inputs(
    shapes: Sequence[Tuple[int, int]],
    batch: int = 2,
    num_queries: int = 7,
    num_heads: int = 2,
    head_dim: int = 4,
    num_points: int = 3,
    dtype: torch.dtype = torch.float64,
    loc_range: Tuple[float, float] = (-0.2, 1.2),
    seed: int = 0,
) -> Inputs:
    """value, spatial_shapes, level_start_index, sampling_locations, attention_weights; locations uniform in
    loc_range, so by default some fall off the map."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).view(-1, 2)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    L = spatial_shapes.shape[0]
    value = torch.randn(batch, int(areas.sum()), num_heads, head_dim, generator=g, dtype=dtype)
    lo, hi = loc_range
    loc = torch.rand(batch, num_queries, num_heads, L, num_points, 2, generator=g, dtype=dtype) * (hi - lo) + lo
    weights = torch.rand(batch, num_queries, num_heads, L, num_points, generator=g, dtype=dtype)
    return value, spatial_shapes, level_start_index, loc, weights


SHAPE_CASES = {
    "one_level": dict(shapes=[(5, 6)]),
    "odd_sizes": dict(shapes=[(7, 5), (3, 1), (1, 1)], head_dim=3, num_points=1),
    "four_levels": dict(shapes=[(9, 11), (5, 6), (3, 3), (2, 1)], num_heads=3, head_dim=8, num_points=4),
    "far_outside": dict(shapes=[(4, 3), (2, 2)], loc_range=(-1.5, 2.5)),
    "wide_heads": dict(shapes=[(6, 4), (3, 2)], batch=1, num_queries=5, num_heads=1, head_dim=37),
}


@requires_op
@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_forward_matches_reference(case: str, dtype: torch.dtype, tol: float):
    inputs = make_inputs(dtype=dtype, **SHAPE_CASES[case])
    out = ms_deform_attn(*inputs)
    ref = ms_deform_attn_pytorch(*inputs)
    N, _, M, D = inputs[0].shape
    assert out.shape == (N, inputs[3].shape[1], M * D) and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@requires_op
def test_backward_matches_reference_autograd():
    inputs = make_inputs(**SHAPE_CASES["four_levels"])
    grad_out = torch.randn(
        inputs[3].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3], dtype=torch.float64
    )
    grads = []
    for fn in (ms_deform_attn, ms_deform_attn_pytorch):
        leaves = [t.clone().requires_grad_() for t in (inputs[0], inputs[3], inputs[4])]
        fn(leaves[0], inputs[1], inputs[2], leaves[1], leaves[2]).backward(grad_out)
        grads.append([t.grad for t in leaves])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@requires_op
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("case", ["one_level", "odd_sizes", "far_outside"])
def test_gradcheck(case: str, device: str):
    kwargs = dict(SHAPE_CASES[case], batch=1, num_queries=3)
    value, shapes, starts, loc, weights = [t.to(device) for t in make_inputs(**kwargs)]
    leaves = [t.requires_grad_() for t in (value, loc, weights)]
    # CUDA's atomic adds sum the value gradient in a varying order: two backward passes differ in the last bits.
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, shapes, starts, loc, w),
        leaves,
        nondet_tol=1e-12 if device == "cuda" else 0.0,
    )


@requires_op
def test_non_contiguous_inputs():
    value, shapes, starts, loc, weights = make_inputs(**SHAPE_CASES["four_levels"])
    # Same values, other memory layouts: value [N, M, S, D] seen as [N, S, M, D], strided views of the rest.
    value_nc = value.transpose(1, 2).contiguous().transpose(1, 2)
    loc_nc = torch.cat([loc, loc], dim=-1)[..., :2]
    weights_nc = weights.transpose(0, 1).contiguous().transpose(0, 1)
    shapes_nc = torch.stack([shapes[:, 0], shapes[:, 1]], dim=0).t()
    assert not any(t.is_contiguous() for t in (value_nc, loc_nc, weights_nc, shapes_nc))
    torch.testing.assert_close(
        ms_deform_attn(value_nc, shapes_nc, starts, loc_nc, weights_nc),
        ms_deform_attn(value, shapes, starts, loc, weights),
        rtol=0,
        atol=0,
    )
    leaves = [t.requires_grad_() for t in (value_nc, loc_nc, weights_nc)]
    grad_out = torch.randn(value.shape[0], value.shape[2] * value.shape[3], loc.shape[1], dtype=value.dtype)
    ms_deform_attn(leaves[0], shapes_nc, starts, leaves[1], leaves[2]).backward(grad_out.transpose(1, 2))
    expected = torch.ops.sparse_detr.ms_deform_attn_backward(
        grad_out.transpose(1, 2).contiguous(), value, shapes, starts, loc, weights
    )
    for leaf, grad in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, grad, rtol=0, atol=0)


@requires_op
@pytest.mark.parametrize("batch,num_queries", [(0, 5), (2, 0)])
def test_empty_inputs(batch: int, num_queries: int):
    value, shapes, starts, loc, weights = make_inputs([(3, 4), (2, 2)], batch=batch, num_queries=num_queries)
    leaves = [t.requires_grad_() for t in (value, loc, weights)]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
    assert out.shape == (batch, num_queries, value.shape[2] * value.shape[3])
    out.sum().backward()
    for t in leaves:
        assert t.grad.shape == t.shape
        assert not t.grad.any()


@requires_op
def test_no_sampling_points():
    """P = 0: every output is zero, and so is every gradient (the kernels still visit each query)."""
    value, shapes, starts, loc, weights = make_inputs([(3, 4), (2, 2)], num_points=0)
    out = ms_deform_attn(value, shapes, starts, loc, weights)
    torch.testing.assert_close(out, ms_deform_attn_pytorch(value, shapes, starts, loc, weights), rtol=0, atol=0)
    grad_out = torch.randn(out.shape, dtype=out.dtype)
    grads = torch.ops.sparse_detr.ms_deform_attn_backward(grad_out, value, shapes, starts, loc, weights)
    assert [g.shape for g in grads] == [value.shape, loc.shape, weights.shape]
    assert not grads[0].any()


@requires_op
def test_backward_is_deterministic_across_thread_counts():
    """The value-gradient scatter is partitioned by (n, m), not by query: no races, so no dependence on threads."""
    inputs = make_inputs([(9, 11), (5, 6)], batch=2, num_queries=40, num_heads=3, dtype=torch.float32)
    grad_out = torch.randn(2, 40, inputs[0].shape[2] * inputs[0].shape[3])
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(torch.ops.sparse_detr.ms_deform_attn_backward(grad_out, *inputs))
    finally:
        torch.set_num_threads(before)
    for multi in results[1:]:
        for single, other in zip(results[0], multi):
            assert torch.equal(single, other)


@requires_op
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_read_only_off_the_map_do_not_leak(dtype: torch.dtype):
    """A neighbour off the map reads as zero and takes no gradient, whatever value sits where its clamped index
    points: here every point lies 1 to 1.5 pixels left of its level (pixel x in [-1.5, -1)), so both its x
    neighbours are off the map, and column 0, where they are clamped to, holds inf and NaN."""
    value, shapes, starts, loc, weights = make_inputs([(4, 5), (3, 3)], batch=1, num_queries=6, dtype=dtype)
    widths = shapes[:, 1].to(dtype).view(1, 1, 1, -1, 1)
    pixel_x = -1.5 + 0.5 * torch.rand(loc.shape[:-1], generator=torch.Generator().manual_seed(1), dtype=dtype)
    loc[..., 0] = (pixel_x + 0.5) / widths
    for (height, width), start in zip(shapes.tolist(), starts.tolist()):
        column0 = start + width * torch.arange(height)
        value[:, column0[0::2]] = float("inf")
        value[:, column0[1::2]] = float("nan")
    grad_out = torch.randn(1, 6, value.shape[2] * value.shape[3], dtype=dtype)
    out = ms_deform_attn(value, shapes, starts, loc, weights)
    grads = torch.ops.sparse_detr.ms_deform_attn_backward(grad_out, value, shapes, starts, loc, weights)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(out, ms_deform_attn_pytorch(value, shapes, starts, loc, weights), rtol=0, atol=0)
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


# The instruction-set levels of the CPU kernels: SPARSE_DETR_CPU_ISA's values and what _C.cpu_isa() reports.
CPU_ISA_LEVELS = {"v4": "x86-64-v4", "v3": "x86-64-v3", "default": "default"}

# Runs in a fresh interpreter with SPARSE_DETR_CPU_ISA set (it is read once per process). It loads the extension
# file itself, not the sparse_detr package, which imports much more. argv: the extension, then optionally a file
# of cases (inputs, grad_output) to run the ops on (results into the file after it), else it prints cpu_isa().
_ISA_CHILD = """
import importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
_C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(_C)
ops = torch.ops.sparse_detr
if len(sys.argv) > 2:
    results = [[ops.ms_deform_attn(*x), *ops.ms_deform_attn_backward(g, *x)] for x, g in torch.load(sys.argv[2])]
    torch.save({"isa": _C.cpu_isa(), "results": results}, sys.argv[3])
else:
    print(_C.cpu_isa())
"""


def _run_with_cpu_isa(isa: Optional[str], *args: str) -> subprocess.CompletedProcess:
    """_ISA_CHILD with SPARSE_DETR_CPU_ISA = `isa` (unset for None)."""
    env = {k: v for k, v in os.environ.items() if k != "SPARSE_DETR_CPU_ISA"}
    if isa is not None:
        env["SPARSE_DETR_CPU_ISA"] = isa
    command = [sys.executable, "-c", _ISA_CHILD, sparse_detr._C.__file__, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def reference_grads(inputs: Inputs, grad_out: Tensor) -> List[Tensor]:
    """Gradients of the grid_sample reference with respect to value, sampling_locations and attention_weights."""
    leaves = [t.detach().clone().requires_grad_() for t in (inputs[0], inputs[3], inputs[4])]
    ms_deform_attn_pytorch(leaves[0], inputs[1], inputs[2], leaves[1], leaves[2]).backward(grad_out)
    return [t.grad for t in leaves]


@pytest.fixture(scope="module")
def isa_cases(tmp_path_factory) -> Tuple[Path, List[Tuple[float, List[Tensor]]]]:
    """Every shape case in float64 and float32, saved for the child processes, with the tolerance and the float64
    reference (forward and the three gradients) of each: for float32 computed from its inputs rounded to float32,
    so that what is compared is the kernel's arithmetic."""
    cases, expected = [], []
    for case in sorted(SHAPE_CASES):
        exact = make_inputs(**SHAPE_CASES[case])
        g = torch.Generator().manual_seed(1)
        grad_out = torch.randn(exact[3].shape[:2] + (exact[0].shape[2] * exact[0].shape[3],), generator=g).double()
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            inputs = [t.to(dtype) if t.is_floating_point() else t for t in exact]
            cases.append((inputs, grad_out.to(dtype)))
            ref_inputs = [t.double() if t.is_floating_point() else t for t in inputs]
            ref_grad_out = grad_out.to(dtype).double()
            ref = [ms_deform_attn_pytorch(*ref_inputs), *reference_grads(ref_inputs, ref_grad_out)]
            expected.append((tol, ref))
    path = tmp_path_factory.mktemp("cpu_isa") / "inputs.pt"
    torch.save(cases, path)
    return path, expected


@pytest.fixture(scope="module")
def best_cpu_isa() -> str:
    """The level the CPU kernels pick when SPARSE_DETR_CPU_ISA is unset: the CPU's best one this build has."""
    done = _run_with_cpu_isa(None)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@requires_op
@pytest.mark.parametrize("isa", list(CPU_ISA_LEVELS))
def test_cpu_isa_level_matches_reference_or_is_refused(isa: str, isa_cases, best_cpu_isa: str, tmp_path: Path):
    """SPARSE_DETR_CPU_ISA forces a level: each one the CPU supports runs, reports itself and matches the reference
    (float64 to 1e-10, float32 to 1e-5 of each tensor's scale); one above the CPU's best is refused, naming the
    variable and that best level."""
    levels = list(CPU_ISA_LEVELS.values())
    assert best_cpu_isa in levels
    inputs_path, expected = isa_cases
    done = _run_with_cpu_isa(isa, str(inputs_path), str(tmp_path / "results.pt"))
    if levels.index(CPU_ISA_LEVELS[isa]) < levels.index(best_cpu_isa):
        best_value = next(value for value, name in CPU_ISA_LEVELS.items() if name == best_cpu_isa)
        assert done.returncode != 0
        message = f"ValueError: ms_deform_attn: SPARSE_DETR_CPU_ISA={isa} asks for the {CPU_ISA_LEVELS[isa]} kernels"
        assert message in done.stderr
        assert f"is {best_cpu_isa} (SPARSE_DETR_CPU_ISA={best_value})" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    ran = torch.load(tmp_path / "results.pt")
    assert ran["isa"] == CPU_ISA_LEVELS[isa]
    assert len(ran["results"]) == len(expected)
    for ours, (tol, ref) in zip(ran["results"], expected):
        for got, want in zip(ours, ref):
            # Location gradients scale with the map size: compare relative to each tensor's scale.
            scale = want.abs().max().clamp_min(1.0)
            torch.testing.assert_close(got.double() / scale, want / scale, rtol=tol, atol=tol)


@requires_op
def test_cpu_isa_rejects_an_unknown_level(isa_cases, tmp_path: Path):
    """Both the kernels and cpu_isa() raise, rather than fall back to some level."""
    message = "ValueError: ms_deform_attn: SPARSE_DETR_CPU_ISA must be v4, v3 or default (or unset: the CPU's best"
    for args in ((str(isa_cases[0]), str(tmp_path / "results.pt")), ()):
        done = _run_with_cpu_isa("avx2", *args)
        assert done.returncode != 0
        assert message in done.stderr and "got 'avx2'" in done.stderr
        assert not (tmp_path / "results.pt").exists()


def _bad(**changes) -> Inputs:
    """Valid inputs (N=2, S=26 over levels 4x5 and 2x3, M=2, D=4, Lq=3, L=2, P=3) with `changes` applied, each a
    function of the argument it replaces."""
    value, shapes, starts, loc, weights = make_inputs([(4, 5), (2, 3)], batch=2, num_queries=3)
    args = dict(
        value=value, spatial_shapes=shapes, level_start_index=starts, sampling_locations=loc, attention_weights=weights
    )
    for name, fn in changes.items():
        args[name] = fn(args[name])
    return tuple(args.values())


def _to_meta(t: Tensor) -> Tensor:
    return t.to("meta")


def _const(rows: List[List[int]]) -> Callable[[Tensor], Tensor]:
    return lambda _: torch.tensor(rows, dtype=torch.int64)


# A 4 x _WRAPS level has 2^64 + 20 positions, 20 once wrapped around in int64: the area of the 4x5 level it
# replaces, so that level_start_index and the sum would agree with wrapped products.
_WRAPS = 2**62 + 5

# The input specification of csrc/ms_deform_attn.h, one row (at least) per rule, in its order, plus rows where two
# rules break and the earlier one must be reported. name: (changes, exception, the exact message).
BAD_INPUTS = {
    # 1. Ranks.
    "value_rank": (dict(value=lambda t: t[0]), ValueError, "value must be [N, S, M, D] (4 dims), got shape [26, 2, 4]"),
    "shapes_rank": (
        dict(spatial_shapes=torch.flatten),
        ValueError,
        "spatial_shapes must be [L, 2] (2 dims), got shape [4]",
    ),
    "starts_rank": (
        dict(level_start_index=lambda t: t[None]),
        ValueError,
        "level_start_index must be [L] (1 dims), got shape [1, 2]",
    ),
    "loc_rank": (
        dict(sampling_locations=lambda t: t[..., 0]),
        ValueError,
        "sampling_locations must be [N, Lq, M, L, P, 2] (6 dims), got shape [2, 3, 2, 2, 3]",
    ),
    "weights_rank": (
        dict(attention_weights=lambda t: t[..., None]),
        ValueError,
        "attention_weights must be [N, Lq, M, L, P] (5 dims), got shape [2, 3, 2, 2, 3, 1]",
    ),
    "rank_before_dtype": (
        dict(value=lambda t: t.float(), attention_weights=lambda t: t[0]),
        ValueError,
        "attention_weights must be [N, Lq, M, L, P] (5 dims), got shape [3, 2, 2, 3]",
    ),
    # 2. Dtypes.
    "value_int": (dict(value=lambda t: t.long()), TypeError, "value must be floating point, got torch.int64"),
    "loc_dtype": (
        dict(sampling_locations=lambda t: t.float()),
        TypeError,
        "sampling_locations has dtype torch.float32 but value has torch.float64",
    ),
    "weights_dtype": (
        dict(attention_weights=lambda t: t.half()),
        TypeError,
        "attention_weights has dtype torch.float16 but value has torch.float64",
    ),
    "shapes_int32": (
        dict(spatial_shapes=lambda t: t.int()),
        TypeError,
        "spatial_shapes must be torch.int64, got torch.int32",
    ),
    "starts_float": (
        dict(level_start_index=lambda t: t.double()),
        TypeError,
        "level_start_index must be torch.int64, got torch.float64",
    ),
    "dtype_before_device": (
        dict(sampling_locations=_to_meta, attention_weights=lambda t: t.float()),
        TypeError,
        "attention_weights has dtype torch.float32 but value has torch.float64",
    ),
    # 3. Devices.
    "value_device": (dict(value=_to_meta), ValueError, "spatial_shapes is on cpu but value is on meta"),
    "shapes_device": (dict(spatial_shapes=_to_meta), ValueError, "spatial_shapes is on meta but value is on cpu"),
    "starts_device": (dict(level_start_index=_to_meta), ValueError, "level_start_index is on meta but value is on cpu"),
    "loc_device": (dict(sampling_locations=_to_meta), ValueError, "sampling_locations is on meta but value is on cpu"),
    "weights_device": (
        dict(attention_weights=_to_meta),
        ValueError,
        "attention_weights is on meta but value is on cpu",
    ),
    "device_before_size": (
        dict(attention_weights=_to_meta, sampling_locations=lambda t: t[:1]),
        ValueError,
        "attention_weights is on meta but value is on cpu",
    ),
    # 4. Sizes.
    "shapes_width": (
        dict(spatial_shapes=lambda t: torch.cat([t, t[:, :1]], 1)),
        ValueError,
        "spatial_shapes must have 2 entries per level (H, W) in dim 1, got shape [2, 3]",
    ),
    "levels_vs_shapes": (
        dict(spatial_shapes=lambda t: t[:1]),
        ValueError,
        "level_start_index must have 1 levels (L of spatial_shapes) in dim 0, got shape [2]",
    ),
    "loc_batch": (
        dict(sampling_locations=lambda t: t[:1]),
        ValueError,
        "sampling_locations must have 2 batch entries (N of value) in dim 0, got shape [1, 3, 2, 2, 3, 2]",
    ),
    "loc_heads": (
        dict(sampling_locations=lambda t: t[:, :, :1]),
        ValueError,
        "sampling_locations must have 2 heads (M of value) in dim 2, got shape [2, 3, 1, 2, 3, 2]",
    ),
    "loc_levels": (
        dict(sampling_locations=lambda t: t[:, :, :, :1]),
        ValueError,
        "sampling_locations must have 2 levels (L of spatial_shapes) in dim 3, got shape [2, 3, 2, 1, 3, 2]",
    ),
    "loc_xy": (
        dict(sampling_locations=lambda t: t[..., :1]),
        ValueError,
        "sampling_locations must have 2 coordinates (x, y) in dim 5, got shape [2, 3, 2, 2, 3, 1]",
    ),
    "weights_batch": (
        dict(attention_weights=lambda t: t[:1]),
        ValueError,
        "attention_weights must have 2 batch entries (N of value) in dim 0, got shape [1, 3, 2, 2, 3]",
    ),
    "weights_queries": (
        dict(attention_weights=lambda t: t[:, :2]),
        ValueError,
        "attention_weights must have 3 queries (Lq of sampling_locations) in dim 1, got shape [2, 2, 2, 2, 3]",
    ),
    "weights_heads": (
        dict(attention_weights=lambda t: t[:, :, :1]),
        ValueError,
        "attention_weights must have 2 heads (M of value) in dim 2, got shape [2, 3, 1, 2, 3]",
    ),
    "weights_levels": (
        dict(attention_weights=lambda t: t[:, :, :, :1]),
        ValueError,
        "attention_weights must have 2 levels (L of spatial_shapes) in dim 3, got shape [2, 3, 2, 1, 3]",
    ),
    "weights_points": (
        dict(attention_weights=lambda t: t[..., :2]),
        ValueError,
        "attention_weights must have 3 points (P of sampling_locations) in dim 4, got shape [2, 3, 2, 2, 2]",
    ),
    "size_before_levels": (
        dict(spatial_shapes=_const([[0, 5], [2, 3]]), attention_weights=lambda t: t[..., :2]),
        ValueError,
        "attention_weights must have 3 points (P of sampling_locations) in dim 4, got shape [2, 3, 2, 2, 2]",
    ),
    # 5a. Positive levels.
    "shapes_zero": (
        dict(spatial_shapes=_const([[0, 5], [2, 3]])),
        ValueError,
        "spatial_shapes[0] must be positive (H, W), got (0, 5)",
    ),
    "shapes_negative": (
        dict(spatial_shapes=_const([[4, 5], [2, -3]])),
        ValueError,
        "spatial_shapes[1] must be positive (H, W), got (2, -3)",
    ),
    # 5b. Level starts.
    "starts_first": (
        dict(level_start_index=lambda t: t + 1),
        ValueError,
        "level_start_index[0] is 1 but spatial_shapes put level 0 at 0",
    ),
    "starts_second": (
        dict(level_start_index=_const([0, 19])),
        ValueError,
        "level_start_index[1] is 19 but spatial_shapes put level 1 at 20",
    ),
    # 5c. Each level fits in what is left of value: also where H * W wraps around in int64.
    "level_too_large": (
        dict(spatial_shapes=_const([[4, 5], [3, 3]])),
        ValueError,
        "spatial_shapes[1] = (3, 3) does not fit in value: level 1 starts at 20 of S = 26",
    ),
    # 2^32 x 2^32 wraps around to 0: with starts [0, 0] and a second level of all 26 positions, wrapped products
    # would agree with level_start_index and S.
    "level_wraps_to_zero": (
        dict(spatial_shapes=_const([[2**32, 2**32], [2, 13]]), level_start_index=_const([0, 0])),
        ValueError,
        "spatial_shapes[0] = (4294967296, 4294967296) does not fit in value: level 0 starts at 0 of S = 26",
    ),
    "level_wraps_to_fit": (
        dict(spatial_shapes=_const([[4, _WRAPS], [2, 3]])),
        ValueError,
        f"spatial_shapes[0] = (4, {_WRAPS}) does not fit in value: level 0 starts at 0 of S = 26",
    ),
    # 5, after the last level: the sum.
    "shapes_short": (
        dict(spatial_shapes=_const([[4, 5], [2, 2]])),
        ValueError,
        "spatial_shapes add up to 24 positions but value has S = 26",
    ),
    "no_levels": (
        dict(
            spatial_shapes=lambda t: t[:0],
            level_start_index=lambda t: t[:0],
            sampling_locations=lambda t: t[:, :, :, :0],
            attention_weights=lambda t: t[:, :, :, :0],
        ),
        ValueError,
        "spatial_shapes add up to 0 positions but value has S = 26",
    ),
}


def _load_without_extension(mp: pytest.MonkeyPatch) -> ModuleType:
    """A fresh copy of ms_deform_attn_op, imported as if sparse_detr._C were missing: the fallback path."""
    mp.setitem(sys.modules, "sparse_detr._C", None)  # makes `from sparse_detr import _C` fail
    mp.delattr(sparse_detr, "_C", raising=False)
    spec = importlib.util.spec_from_file_location("_msda_without_ext", ms_deform_attn_op.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fallback_op() -> ModuleType:
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the missing extension's, tested below
        return _load_without_extension(mp)


def _raised(fn: Callable, *args) -> Tuple[type, str]:
    with pytest.raises(Exception) as info:
        fn(*args)
    return info.type, str(info.value)


def _op_on_cpu(op: "torch._ops.OpOverloadPacket", *args):
    """The op's CPU kernel. Through the dispatcher a meta tensor among the arguments picks the fake (meta) kernel,
    which computes shapes only, so the rows mixing devices call the CPU kernel's own checks directly."""
    if any(isinstance(a, Tensor) and a.is_meta for a in args):
        return op.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)
    return op(*args)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fallback_raises_or_computes_what_it_reads(case: str, fallback_op: ModuleType):
    """Without the extension the pure-PyTorch path checks nothing itself: PyTorch's ops reject what it cannot compute,
    and what they let through computes what the valid inputs do (e.g. level_start_index, which the reference does
    not read, or attention weights of one more unit dim) -- never a wrong answer."""
    changes, _, _ = BAD_INPUTS[case]
    altered = _bad(**changes)
    try:
        out = fallback_op.ms_deform_attn(*altered)
    except (TypeError, ValueError, RuntimeError, IndexError, NotImplementedError):
        return
    # what it read: the altered values (e.g. weights rounded to float16) in the valid layout and dtype
    read = [a.to(v.dtype).reshape(v.shape) if a.is_floating_point() else v for a, v in zip(altered, _bad())]
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*read), check_dtype=False)


@requires_op
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_python_wrapper_and_cuda_check(case: str):
    """ms_deform_attn raises what the op raises (it is the op's check), and `_C.check_inputs`, which the wrapper
    runs before an eager CUDA call, raises the same: one specification, written in C++."""
    changes, exc, message = BAD_INPUTS[case]
    inputs = _bad(**changes)
    assert _raised(sparse_detr._C.check_inputs, *inputs) == (exc, f"ms_deform_attn: {message}")
    if not any(t.is_meta for t in inputs):  # a meta tensor picks the fake kernel (see _op_on_cpu)
        assert _raised(ms_deform_attn, *inputs) == (exc, f"ms_deform_attn: {message}")


@requires_op
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_compiled_op(case: str):
    """The forward op and the backward op (its inputs are checked before grad_output) raise as the Python path."""
    changes, exc, message = BAD_INPUTS[case]
    inputs = _bad(**changes)
    grad_output = torch.zeros(2, 3, 8, dtype=torch.float64)
    assert _raised(_op_on_cpu, torch.ops.sparse_detr.ms_deform_attn, *inputs) == (exc, f"ms_deform_attn: {message}")
    assert _raised(_op_on_cpu, torch.ops.sparse_detr.ms_deform_attn_backward, grad_output, *inputs) == (
        exc,
        f"ms_deform_attn: {message}",
    )


@requires_op
@pytest.mark.parametrize("name", ["value", "attention_weights"])
def test_not_a_tensor(name: str):
    """Rule 0: the op's schema names the argument."""
    inputs = _bad(**{name: Tensor.tolist})
    for fn in (ms_deform_attn, torch.ops.sparse_detr.ms_deform_attn):
        exc, message = _raised(fn, *inputs)
        assert exc is RuntimeError and f"Expected a value of type 'Tensor' for argument '{name}'" in message


@requires_op
@pytest.mark.parametrize(
    "grad_output,exc,message",
    [
        (
            torch.zeros(2, 3, 5, dtype=torch.float64),
            ValueError,
            "grad_output must be [N, Lq, M * D] = [2, 3, 8], got [2, 3, 5]",
        ),
        (torch.zeros(2, 3, 8), TypeError, "grad_output has dtype torch.float32 but value has torch.float64"),
        (
            torch.zeros(2, 3, 8, dtype=torch.float64, device="meta"),
            ValueError,
            "grad_output is on meta but value is on cpu",
        ),
    ],
    ids=["shape", "dtype", "device"],
)
def test_backward_op_checks_grad_output(grad_output: Tensor, exc: type, message: str):
    assert _raised(_op_on_cpu, torch.ops.sparse_detr.ms_deform_attn_backward, grad_output, *_bad()) == (
        exc,
        f"ms_deform_attn_backward: {message}",
    )


@requires_op
def test_cpu_rejects_half_alike_on_both_paths():
    args = _bad(value=torch.Tensor.half, sampling_locations=torch.Tensor.half, attention_weights=torch.Tensor.half)
    message = "ms_deform_attn: value has dtype torch.float16; the CPU kernel supports torch.float32, torch.float64"
    assert _raised(ms_deform_attn, *args) == (TypeError, message)
    assert _raised(torch.ops.sparse_detr.ms_deform_attn, *args) == (TypeError, message)


@requires_op
def test_opcheck():
    """torch.library's own audit: schema, fake kernels, autograd registration, AOT dispatch with dynamic shapes."""
    value, shapes, starts, loc, weights = make_inputs(**SHAPE_CASES["four_levels"])
    torch.library.opcheck(
        torch.ops.sparse_detr.ms_deform_attn.default,
        (value.requires_grad_(), shapes, starts, loc.requires_grad_(), weights.requires_grad_()),
    )
    grad_out = torch.randn(loc.shape[0], loc.shape[1], value.shape[2] * value.shape[3], dtype=value.dtype)
    torch.library.opcheck(
        torch.ops.sparse_detr.ms_deform_attn_backward.default,
        (grad_out, value.detach(), shapes, starts, loc.detach(), weights.detach()),
    )


class _TinyDeformAttn(nn.Module):
    """The op between two projections, the way the transformer uses it."""

    def __init__(self, shapes: List[Tuple[int, int]], dim: int = 8, heads: int = 2, points: int = 2):
        super().__init__()
        self.heads, self.points, self.levels = heads, points, len(shapes)
        shapes_t = torch.tensor(shapes, dtype=torch.int64)
        areas = shapes_t.prod(1)
        self.register_buffer("spatial_shapes", shapes_t, persistent=False)
        self.register_buffer(
            "level_start_index", torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]), persistent=False
        )
        self.value_proj = nn.Linear(dim, dim)
        self.offsets = nn.Linear(dim, heads * self.levels * points * 2)
        self.weights = nn.Linear(dim, heads * self.levels * points)

    def forward(self, query: Tensor, reference_points: Tensor, src: Tensor) -> Tensor:
        N, Lq, C = query.shape
        value = self.value_proj(src).view(N, src.shape[1], self.heads, C // self.heads)
        offsets = self.offsets(query).view(N, Lq, self.heads, self.levels, self.points, 2)
        loc = reference_points[:, :, None, None, None, :] + 0.1 * offsets.tanh()
        weights = self.weights(query).view(N, Lq, self.heads, self.levels * self.points).softmax(-1)
        weights = weights.view(N, Lq, self.heads, self.levels, self.points)
        return ms_deform_attn(value, self.spatial_shapes, self.level_start_index, loc, weights)


def _tiny_module_inputs():
    torch.manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    module = _TinyDeformAttn(shapes)
    S = sum(h * w for h, w in shapes)
    return module, (torch.randn(2, 6, 8), torch.rand(2, 6, 2), torch.randn(2, S, 8))


@requires_op
def test_torch_compile_fullgraph_matches_eager():
    module, args = _tiny_module_inputs()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    leaves_eager = [a.clone().requires_grad_() for a in args]
    leaves_compiled = [a.clone().requires_grad_() for a in args]
    out_eager = module(*leaves_eager)
    out_compiled = compiled(*leaves_compiled)
    torch.testing.assert_close(out_compiled, out_eager)
    out_eager.square().sum().backward()
    out_compiled.square().sum().backward()
    for a, b in zip(leaves_compiled, leaves_eager):
        torch.testing.assert_close(a.grad, b.grad)


@requires_op
def test_export_and_jit_trace_see_one_op():
    module, args = _tiny_module_inputs()
    expected = module(*args)
    exported = torch.export.export(module, args)
    assert "sparse_detr.ms_deform_attn" in str(exported.graph)
    torch.testing.assert_close(exported.module()(*args), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # jit.trace is deprecated, fvcore still uses it
        traced = torch.jit.trace(module, args, check_trace=False)
    assert "sparse_detr::ms_deform_attn" in str(traced.inlined_graph)
    torch.testing.assert_close(traced(*args), expected)


def test_falls_back_to_reference_with_one_warning(monkeypatch):
    """Without the extension the module still imports, warns once, and computes with the reference."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh = _load_without_extension(monkeypatch)
        inputs = make_inputs([(4, 5)], batch=1)
        out = fresh.ms_deform_attn(*inputs)
        fresh.ms_deform_attn(*inputs)
    messages = [str(w.message) for w in caught if "sparse_detr._C could not be loaded" in str(w.message)]
    assert len(messages) == 1 and "pure-PyTorch reference" in messages[0]
    assert not fresh.ms_deform_attn_available()
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs), rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_cuda_matches_cpu_kernel_float64(case: str):
    inputs = make_inputs(dtype=torch.float64, **SHAPE_CASES[case])
    grad_out = torch.randn(
        inputs[3].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3], dtype=torch.float64
    )
    cpu = [
        torch.ops.sparse_detr.ms_deform_attn(*inputs),
        *torch.ops.sparse_detr.ms_deform_attn_backward(grad_out, *inputs),
    ]
    on_gpu = [t.cuda() for t in inputs]
    gpu = [
        torch.ops.sparse_detr.ms_deform_attn(*on_gpu),
        *torch.ops.sparse_detr.ms_deform_attn_backward(grad_out.cuda(), *on_gpu),
    ]
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-10, atol=1e-10)


def assert_low_precision_close(forward, backward, device: str, dtype: torch.dtype, tol: float, **case) -> None:
    """`forward` and `backward` (the op's signatures) in `dtype` on `device` against float64 on the same inputs."""
    inputs = make_inputs(dtype=torch.float64, **case)
    grad_out = torch.randn(
        inputs[3].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3], dtype=torch.float64
    )
    # Round the inputs to `dtype` first, so that what is compared is the kernel's arithmetic (float32
    # accumulation), not the rounding of the locations (which can move a point into another pixel).
    inputs = [t.to(dtype).double() if t.is_floating_point() else t for t in inputs]
    grad_out = grad_out.to(dtype).double()
    exact = [ms_deform_attn_pytorch(*inputs), *torch.ops.sparse_detr.ms_deform_attn_backward(grad_out, *inputs)]
    low = [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in inputs]
    out = forward(*low)
    grads = backward(grad_out.to(device=device, dtype=dtype), *low)
    for ours, ref in zip([out, *grads], exact):
        assert ours.dtype == dtype
        # Relative to the tensor's scale: location gradients are sums of many terms.
        scale = ref.abs().max().clamp_min(1.0)
        torch.testing.assert_close(ours.double().cpu() / scale, ref / scale, rtol=tol, atol=tol)


LOW_PRECISION_TOLERANCES = [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)]


@requires_cuda
@pytest.mark.parametrize("dtype,tol", LOW_PRECISION_TOLERANCES)
def test_cuda_low_precision_matches_float64(dtype: torch.dtype, tol: float):
    assert_low_precision_close(
        ms_deform_attn, torch.ops.sparse_detr.ms_deform_attn_backward, "cuda", dtype, tol, **SHAPE_CASES["four_levels"]
    )
