"""Multi-scale deformable attention core: the compiled op and its pure-PyTorch reference, same signature.

`ms_deform_attn` runs the custom op `torch.ops.sparse_detr.ms_deform_attn` built from csrc/ (CPU: float32/float64;
CUDA: float32/float16/bfloat16/float64). The op has autograd and a fake (meta) kernel registered here, so it works
under `torch.compile(fullgraph=True)`, `torch.export` and `torch.jit.trace` (fvcore's FLOP counter sees it as
`sparse_detr::ms_deform_attn`). When the extension is missing, `ms_deform_attn` falls back to the reference
`ms_deform_attn_pytorch` after one warning; importing never fails.
"""

import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

_OP_NAME = "sparse_detr::ms_deform_attn"
_BACKWARD_OP_NAME = "sparse_detr::ms_deform_attn_backward"


def _load_extension() -> Tuple[Optional[object], Optional[str]]:
    try:
        from sparse_detr import _C
    except Exception as e:  # a missing or stale build must not break `import sparse_detr`
        return None, f"{type(e).__name__}: {e}"
    return _C, None


_C, _LOAD_ERROR = _load_extension()
if _C is None:
    warnings.warn(
        f"sparse_detr._C could not be loaded ({_LOAD_ERROR}); ms_deform_attn falls back to the pure-PyTorch "
        "reference, which is much slower and needs much more memory. Build the extension with `make build-ext`.",
        RuntimeWarning,
        stacklevel=2,
    )


def ms_deform_attn_available() -> bool:
    """True when the compiled extension `sparse_detr._C` is loaded."""
    return _C is not None


def ms_deform_attn_cpu_isa() -> Optional[str]:
    """The x86-64 level the CPU kernels run at in this process ("x86-64-v4": AVX-512, "x86-64-v3": AVX2 + FMA,
    "default"): the CPU's best unless the environment variable SPARSE_DETR_CPU_ISA (v4, v3, default) asks for a
    lower one. None without the compiled extension."""
    return None if _C is None else _C.cpu_isa()


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Reference built on `grid_sample` (bilinear, zeros outside the map, align_corners=False).

    Args:
        value: [N, S, M, D]
        spatial_shapes: [L, 2] as (H, W); sum of H*W == S
        level_start_index: [L]
        sampling_locations: [N, Lq, M, L, P, 2] normalized (x, y)
        attention_weights: [N, Lq, M, L, P]
    Returns:
        [N, Lq, M*D]
    """
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes: List[List[int]] = spatial_shapes.tolist()
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lid, (h, w) in enumerate(shapes):
        # [N, h*w, M, D] -> [N*M, D, h, w]
        v = value_list[lid].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N, Lq, M, L, P] -> [N*M, 1, Lq, L*P]
    w = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * w).sum(-1).view(N, M * D, Lq)
    return out.transpose(1, 2).contiguous()


_warned_no_cuda_kernels = False


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention core (Deformable DETR's MSDeformAttn sampling and weighting).

    Every query samples each of its M heads' values at L x P locations (bilinear, zeros outside the map,
    align_corners=False, i.e. `grid_sample` semantics) and sums them weighted by `attention_weights`.

    Args:
        value: [N, S, M, D], the S = sum(H_l * W_l) tokens of all levels, level after level, row-major.
        spatial_shapes: [L, 2] int64, (H_l, W_l) of each level.
        level_start_index: [L] int64, offset of each level in S (the exclusive prefix sum of H_l * W_l).
        sampling_locations: [N, Lq, M, L, P, 2] normalized (x, y): (0, 0) is the top-left corner of the map,
            (1, 1) the bottom-right one.
        attention_weights: [N, Lq, M, L, P], same dtype as value.
    Returns:
        [N, Lq, M * D], heads concatenated.
    Raises:
        TypeError / ValueError naming the argument on bad input: the compiled op checks the specification written
        in csrc/ms_deform_attn.h. On CUDA its kernels assert only part of the level rules (each level within value),
        so in eager mode the whole specification runs first on host copies of the two small level tensors
        (`_C.check_inputs`, one sync); under torch.compile/export/tracing that is left out. Without the compiled
        extension, PyTorch's own ops reject what the reference cannot compute.
    """
    # not a Tensor: the op's schema says which argument
    on_cuda = isinstance(value, Tensor) and value.is_cuda
    if _C is None:
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if on_cuda and not _C.compiled_with_cuda():
        global _warned_no_cuda_kernels
        if not _warned_no_cuda_kernels:
            _warned_no_cuda_kernels = True
            warnings.warn(
                "sparse_detr._C was built without CUDA kernels; ms_deform_attn falls back to the pure-PyTorch "
                "reference on CUDA tensors. Rebuild on a machine with a CUDA toolkit (FORCE_CUDA=1 without a GPU).",
                RuntimeWarning,
                stacklevel=2,
            )
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if on_cuda and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
        _C.check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return torch.ops.sparse_detr.ms_deform_attn(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _register_op_python_parts() -> None:
    """Fake kernels (shapes only, for torch.compile/export) and autograd of the compiled ops."""

    @torch.library.register_fake(_OP_NAME)
    def _fake_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        N, _, M, D = value.shape
        return value.new_empty((N, sampling_locations.shape[1], M * D))

    @torch.library.register_fake(_BACKWARD_OP_NAME)
    def _fake_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return (
            torch.empty_like(value, memory_format=torch.contiguous_format),
            torch.empty_like(sampling_locations, memory_format=torch.contiguous_format),
            torch.empty_like(attention_weights, memory_format=torch.contiguous_format),
        )

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = torch.ops.sparse_detr.ms_deform_attn_backward(
            grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return grad_value, None, None, grad_locations, grad_weights

    torch.library.register_autograd(_OP_NAME, _backward, setup_context=_setup_context)


if _C is not None:
    _register_op_python_parts()
