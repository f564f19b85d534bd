"""The CUDA kernels' thread functions, run on the CPU by the host harness, against the grid_sample reference.

`torch.ops.sparse_detr_cuda_harness` runs the host side of the CUDA ops and then every thread of the launch the
GPU would get, one after another (csrc/cuda/ms_deform_attn_harness.cpp): what a GPU runs, except the launch.
"""

import pytest
import torch
from test_ms_deform_attn_op import (
    LOW_PRECISION_TOLERANCES,
    SHAPE_CASES,
    assert_low_precision_close,
    make_inputs,
    requires_cuda,
    requires_op,
)

from sparse_detr.layers import ms_deform_attn_pytorch

pytestmark = requires_op


HARNESS = torch.ops.sparse_detr_cuda_harness


def _grad_output(inputs, dtype: torch.dtype) -> torch.Tensor:
    value, loc = inputs[0], inputs[3]
    g = torch.Generator().manual_seed(1)
    return torch.randn(loc.shape[0], loc.shape[1], value.shape[2] * value.shape[3], generator=g, dtype=dtype)


def _reference_grads(inputs, grad_out):
    """Gradients of the reference with respect to value, sampling_locations and attention_weights."""
    leaves = [t.clone().requires_grad_() for t in (inputs[0], inputs[3], inputs[4])]
    ms_deform_attn_pytorch(leaves[0], inputs[1], inputs[2], leaves[1], leaves[2]).backward(grad_out)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_forward_and_backward_match_reference(case: str, dtype: torch.dtype, tol: float):
    inputs = make_inputs(dtype=dtype, **SHAPE_CASES[case])
    grad_out = _grad_output(inputs, dtype)
    out = HARNESS.ms_deform_attn(*inputs)
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs), rtol=tol, atol=tol)
    grads = HARNESS.ms_deform_attn_backward(grad_out, *inputs)
    for ours, ref in zip(grads, _reference_grads(inputs, grad_out)):
        assert ours.dtype == dtype and ours.shape == ref.shape
        # Location gradients scale with the map size: compare relative to each tensor's scale.
        scale = ref.abs().max().clamp_min(1.0)
        torch.testing.assert_close(ours / scale, ref / scale, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
@pytest.mark.parametrize("dtype,tol", [t for t in LOW_PRECISION_TOLERANCES if t[0] != torch.float32])
def test_low_precision_matches_float64(case: str, dtype: torch.dtype, tol: float):
    """float16 and bfloat16 loads and stores with float32 accumulation, as on the GPU."""
    assert_low_precision_close(
        HARNESS.ms_deform_attn, HARNESS.ms_deform_attn_backward, "cpu", dtype, tol, **SHAPE_CASES[case]
    )


@pytest.mark.parametrize("head_dim", [1, 2, 3, 16, 32, 33, 64])
def test_every_backward_group_size(head_dim: int):
    """The backward gives each (n, q, m) a group of D lanes rounded up to a power of two, at most 32; a lane strides
    over the channels when D > 32. Each group size against the CPU kernel in float64."""
    inputs = make_inputs([(5, 7), (2, 3)], batch=2, num_queries=9, num_heads=3, head_dim=head_dim, num_points=2)
    grad_out = _grad_output(inputs, torch.float64)
    torch.testing.assert_close(
        HARNESS.ms_deform_attn(*inputs), torch.ops.sparse_detr.ms_deform_attn(*inputs), rtol=1e-12, atol=1e-12
    )
    for ours, cpu in zip(
        HARNESS.ms_deform_attn_backward(grad_out, *inputs),
        torch.ops.sparse_detr.ms_deform_attn_backward(grad_out, *inputs),
    ):
        torch.testing.assert_close(ours, cpu, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch,num_queries", [(0, 5), (2, 0)])
def test_empty_inputs(batch: int, num_queries: int):
    inputs = make_inputs([(3, 4), (2, 2)], batch=batch, num_queries=num_queries)
    out = HARNESS.ms_deform_attn(*inputs)
    assert out.shape == (batch, num_queries, inputs[0].shape[2] * inputs[0].shape[3])
    grads = HARNESS.ms_deform_attn_backward(_grad_output(inputs, torch.float64), *inputs)
    for grad, like in zip(grads, (inputs[0], inputs[3], inputs[4])):
        assert grad.shape == like.shape and not grad.any()


def test_bad_levels_raise_instead_of_reaching_the_threads():
    """The harness checks spatial_shapes on the host, as the CPU op does; the threads' own check would abort."""
    value, shapes, starts, loc, weights = make_inputs([(4, 5), (2, 3)])
    grown = shapes + torch.tensor([[0, 0], [1, 0]])  # level starts stay consistent, the total exceeds S
    with pytest.raises(ValueError, match="spatial_shapes"):
        HARNESS.ms_deform_attn(value, grown, starts, loc, weights)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernels_match_harness(dtype: torch.dtype):
    """The kernels on the GPU against their thread functions on the CPU: the same arithmetic, so the two differ only
    by the order of the atomic adds and by contractions into fused multiply-adds."""
    inputs = [t.to(dtype) if t.is_floating_point() else t for t in make_inputs(**SHAPE_CASES["four_levels"])]
    grad_out = _grad_output(inputs, dtype)
    host = [HARNESS.ms_deform_attn(*inputs), *HARNESS.ms_deform_attn_backward(grad_out, *inputs)]
    on_gpu = [t.cuda() for t in inputs]
    gpu = [
        torch.ops.sparse_detr.ms_deform_attn(*on_gpu),
        *torch.ops.sparse_detr.ms_deform_attn_backward(grad_out.cuda(), *on_gpu),
    ]
    # float64/float32: the order of the sums; float16/bfloat16: a few units in the last place of the stores. A
    # launch that misses or repeats threads, or a group sum over the wrong lanes, is off by the values themselves.
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 4 * torch.finfo(dtype).eps)
    for h, g in zip(host, gpu):
        scale = h.abs().max().clamp_min(1.0)
        torch.testing.assert_close(g.cpu() / scale, h / scale, rtol=tol, atol=tol)
