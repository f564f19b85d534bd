"""FLOP counting of SparseDETR with fvcore, comparable to the figures of the paper.

The paper's figures come from fvcore run on the reference implementation with its multi-scale deformable attention
in the pure-PyTorch path (one `grid_sample` per level, then a weighted sum). fvcore counts `aten::grid_sampler` as
4 FLOPs per output element (bilinear: four taps) and counts neither `aten::mul` nor `aten::sum`, so the reference
path costs 4 * N * M * D * Lq * L * P per call. :func:`ms_deform_attn_flop_jit` gives the compiled op
`sparse_detr::ms_deform_attn` exactly that count, so a model running the compiled op is counted like one running the
grid_sample path.
"""

from numbers import Number
from typing import Any, List

from detectron2.utils.analysis import FlopCountAnalysis as _D2FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

__all__ = ["MS_DEFORM_ATTN_OP", "ms_deform_attn_flop_jit", "FlopCountAnalysis"]

# The name the compiled op has in a jit trace (its torch.library namespace and name).
MS_DEFORM_ATTN_OP = "sparse_detr::ms_deform_attn"


def ms_deform_attn_flop_jit(inputs: List[Any], outputs: List[Any]) -> Number:
    """fvcore handle for `sparse_detr::ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
    attention_weights)`.

    value: [N, S, M, D], sampling_locations: [N, Lq, M, L, P, 2]. Each of the N * Lq * M * L * P samples reads D
    channels bilinearly: 4 FLOPs per sampled channel, as fvcore's `aten::grid_sampler` handle counts the
    equivalent `grid_sample` output [N * M, D, Lq, P] of every level. The attention-weighted sum is not counted,
    as fvcore does not count the `mul` and `sum` of the reference path.
    """
    if len(inputs) < 5:
        raise ValueError(f"{MS_DEFORM_ATTN_OP} expects 5 inputs, the trace has {len(inputs)}")
    value_shape = get_shape(inputs[0])
    locations_shape = get_shape(inputs[3])
    if value_shape is None or len(value_shape) != 4:
        raise ValueError(f"{MS_DEFORM_ATTN_OP}: value must be [N, S, M, D], the trace has shape {value_shape}")
    if locations_shape is None or len(locations_shape) != 6:
        raise ValueError(
            f"{MS_DEFORM_ATTN_OP}: sampling_locations must be [N, Lq, M, L, P, 2], "
            f"the trace has shape {locations_shape}"
        )
    n, lq, m, num_levels, num_points, _ = locations_shape
    head_dim = value_shape[3]
    return 4 * n * lq * m * num_levels * num_points * head_dim


class FlopCountAnalysis(_D2FlopCountAnalysis):
    """detectron2's :class:`~detectron2.utils.analysis.FlopCountAnalysis` (models taking `list[dict]`, elementwise
    ops not counted) that also counts `sparse_detr::ms_deform_attn`, really leaves out batch norm and refuses a model
    prepared for inference.

    detectron2 means not to count `aten::batch_norm` (frozen BN folds into the convolution at inference), but
    fvcore lets its default handle win over an ignored op, so its FLOPs would be counted; the reference's
    FrozenBatchNorm2d (a mul and an add) is not counted by fvcore either.

    The paper counts the model as the reference computes it; `prepare_for_inference`'s fast path gets the same
    outputs with fewer FLOPs (the decoder samples before projecting, proposal boxes only for the queries), which the
    published figures are not about.

    Args:
        model: a detectron2 model, or any module; not one prepared for inference.
        inputs: what `model` is called with, e.g. `[{"image": tensor}]`.
    """

    def __init__(self, model: nn.Module, inputs: Any):
        if getattr(model, "fast_inference", False):
            raise ValueError(
                "model: prepared for inference (fast path); count FLOPs on the model as written (the paper's figures "
                "count the reference's computation): build it without prepare_for_inference"
            )
        super().__init__(model, inputs)
        self._op_handles.pop("aten::batch_norm", None)
        self.set_op_handle(MS_DEFORM_ATTN_OP, ms_deform_attn_flop_jit)
