"""The compiled multi-scale deformable attention op against its grid_sample reference, on CPU (CUDA where present)."""
import importlib.util
import re
import sys
import warnings
from typing import List, Sequence, Tuple

import pytest
import torch
from torch import Tensor, nn

import sparse_detr
from sparse_detr.layers import ms_deform_attn, ms_deform_attn_available, ms_deform_attn_pytorch
from sparse_detr.layers import ms_deform_attn_op

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
    grad_out = torch.randn(inputs[3].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3],
                           dtype=torch.float64)
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
    assert torch.autograd.gradcheck(lambda v, l, w: ms_deform_attn(v, shapes, starts, l, w), leaves,
                                    nondet_tol=1e-12 if device == "cuda" else 0.0)


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
def test_backward_is_deterministic_across_thread_counts():
    """The value-gradient scatter is partitioned by (n, m), not by query: no races, so no dependence on threads."""
    inputs = make_inputs([(9, 11), (5, 6)], batch=2, num_queries=40, num_heads=3, dtype=torch.float32)
    grad_out = torch.randn(2, 40, inputs[0].shape[2] * inputs[0].shape[3])
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            results.append(torch.ops.sparse_detr.ms_deform_attn_backward(grad_out, *inputs))
    finally:
        torch.set_num_threads(before)
    for single, multi in zip(*results):
        assert torch.equal(single, multi)


def _bad(**changes) -> Inputs:
    value, shapes, starts, loc, weights = make_inputs([(4, 5), (2, 3)], batch=2, num_queries=3)
    args = dict(value=value, spatial_shapes=shapes, level_start_index=starts, sampling_locations=loc,
                attention_weights=weights)
    for name, fn in changes.items():
        args[name] = fn(args[name])
    return tuple(args.values())


def _grow_last_level(shapes: Tensor) -> Tensor:
    """Level starts stay consistent, the total no longer matches S."""
    return shapes + torch.tensor([[0, 0], [1, 0]])


BAD_INPUTS = {
    # name: (changes, exception, words the message must contain)
    "value_rank": (dict(value=lambda t: t[0]), ValueError, "value must be [N, S, M, D]"),
    "shapes_rank": (dict(spatial_shapes=lambda t: t.flatten()), ValueError, "spatial_shapes must be [L, 2]"),
    "starts_rank": (dict(level_start_index=lambda t: t[None]), ValueError, "level_start_index must be [L]"),
    "loc_rank": (dict(sampling_locations=lambda t: t[..., 0]), ValueError, "sampling_locations must be"),
    "weights_rank": (dict(attention_weights=lambda t: t[..., None]), ValueError, "attention_weights must be"),
    "not_a_tensor": (dict(attention_weights=lambda t: t.tolist()), TypeError, "attention_weights must be a Tensor"),
    "value_int": (dict(value=lambda t: t.long()), TypeError, "value must be floating point"),
    "loc_dtype": (dict(sampling_locations=lambda t: t.float()), TypeError, "sampling_locations has dtype"),
    "weights_dtype": (dict(attention_weights=lambda t: t.float()), TypeError, "attention_weights has dtype"),
    "shapes_int32": (dict(spatial_shapes=lambda t: t.int()), TypeError, "spatial_shapes must be int64"),
    "starts_int32": (dict(level_start_index=lambda t: t.int()), TypeError, "level_start_index must be int64"),
    "device": (dict(sampling_locations=lambda t: t.to("meta")), ValueError, "sampling_locations is on meta"),
    "shapes_sum": (dict(spatial_shapes=_grow_last_level), ValueError, "spatial_shapes add up to"),
    "starts_wrong": (dict(level_start_index=lambda t: t + 1), ValueError, "level_start_index[0] is 1"),
    "shapes_zero": (dict(spatial_shapes=lambda t: t * torch.tensor([[0, 1], [1, 1]])), ValueError, "positive"),
    "heads": (dict(sampling_locations=lambda t: t[:, :, :1]), ValueError, "sampling_locations has shape"),
    "levels": (dict(attention_weights=lambda t: t[:, :, :, :1]), ValueError, "attention_weights has shape"),
    "points": (dict(attention_weights=lambda t: t[..., :2]), ValueError, "attention_weights has shape"),
    "queries": (dict(attention_weights=lambda t: t[:, :2]), ValueError, "attention_weights has shape"),
    "batch": (dict(sampling_locations=lambda t: t[:1]), ValueError, "sampling_locations has shape"),
    "xy": (dict(sampling_locations=lambda t: t[..., :1]), ValueError, "sampling_locations has shape"),
    "levels_vs_shapes": (dict(spatial_shapes=lambda t: t[:1]), ValueError, "level_start_index has shape"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise_in_python(case: str):
    changes, exc, words = BAD_INPUTS[case]
    with pytest.raises(exc, match=re.escape(words)):
        ms_deform_attn(*_bad(**changes))


@requires_op
def test_cpu_rejects_half():
    with pytest.raises(TypeError, match="CPU kernel supports"):
        ms_deform_attn(*_bad(value=torch.Tensor.half, sampling_locations=torch.Tensor.half,
                             attention_weights=torch.Tensor.half))


CPP_BAD_INPUTS = {
    # The same mistakes reaching the op directly (torch.compile or export skip the Python value checks).
    "shapes_sum": (dict(spatial_shapes=_grow_last_level), "spatial_shapes add up to"),
    "starts_wrong": (dict(level_start_index=lambda t: t + 1), "level_start_index[0] is 1"),
    "value_rank": (dict(value=lambda t: t[0]), "value must be [N, S, M, D]"),
    "heads": (dict(sampling_locations=lambda t: t[:, :, :1]), "sampling_locations must have 2 heads"),
    "points": (dict(attention_weights=lambda t: t[..., :2]), "attention_weights must have 3 points"),
    "loc_dtype": (dict(sampling_locations=lambda t: t.float()), "sampling_locations has dtype"),
    "shapes_int32": (dict(spatial_shapes=lambda t: t.int()), "spatial_shapes must be int64"),
}


@requires_op
@pytest.mark.parametrize("case", sorted(CPP_BAD_INPUTS))
def test_bad_inputs_raise_in_cpp(case: str):
    changes, words = CPP_BAD_INPUTS[case]
    with pytest.raises(RuntimeError, match=re.escape(words)):
        torch.ops.sparse_detr.ms_deform_attn(*_bad(**changes))


@requires_op
def test_backward_op_checks_grad_output():
    inputs = _bad()
    with pytest.raises(RuntimeError, match=r"grad_output must be \[N, Lq, M \* D\]"):
        torch.ops.sparse_detr.ms_deform_attn_backward(torch.zeros(2, 3, 5, dtype=torch.float64), *inputs)


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
        self.register_buffer("level_start_index", torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]),
                             persistent=False)
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
    monkeypatch.setitem(sys.modules, "sparse_detr._C", None)  # makes `from sparse_detr import _C` fail
    monkeypatch.delattr(sparse_detr, "_C", raising=False)
    spec = importlib.util.spec_from_file_location("_msda_without_ext", ms_deform_attn_op.__file__)
    fresh = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec.loader.exec_module(fresh)
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
    grad_out = torch.randn(inputs[3].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3],
                           dtype=torch.float64)
    cpu = [torch.ops.sparse_detr.ms_deform_attn(*inputs),
           *torch.ops.sparse_detr.ms_deform_attn_backward(grad_out, *inputs)]
    on_gpu = [t.cuda() for t in inputs]
    gpu = [torch.ops.sparse_detr.ms_deform_attn(*on_gpu),
           *torch.ops.sparse_detr.ms_deform_attn_backward(grad_out.cuda(), *on_gpu)]
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-10, atol=1e-10)


def assert_low_precision_close(forward, backward, device: str, dtype: torch.dtype, tol: float, **case) -> None:
    """`forward` and `backward` (the op's signatures) in `dtype` on `device` against float64 on the same inputs."""
    inputs = make_inputs(dtype=torch.float64, **case)
    grad_out = torch.randn(inputs[3].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3],
                           dtype=torch.float64)
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
    assert_low_precision_close(ms_deform_attn, torch.ops.sparse_detr.ms_deform_attn_backward, "cuda", dtype, tol,
                               **SHAPE_CASES["four_levels"])
