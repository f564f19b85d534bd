"""ONNX: the torch.export graph of :class:`ExportableSparseDETR` translated by `torch.onnx` (the dynamo exporter), with
the compiled deformable attention op `sparse_detr::ms_deform_attn` written in one of two forms:

- ``"grid_sample"``: standard ONNX (opset 18). Per level one `GridSample` (bilinear, zero padding,
  align_corners=0: the op's semantics) on that level's slice of the values, then the attention-weighted sum, as
  `ms_deform_attn_pytorch` computes it. The level sizes and offsets are read at run time from the op's
  `spatial_shapes` and `level_start_index` inputs, so the graph takes images of any size. onnxruntime runs it on
  the CPU.
- ``"trt_plugin"``: one `MultiscaleDeformableAttnPlugin_TRT` node (domain ``trt``) per call: TensorRT's plugin for
  this op, found by the ONNX-TensorRT parser from the node's name. Inputs in the plugin's order and types: value
  [N, S, M, D], spatial_shapes [L, 2] int32, level_start_index [L] int32, sampling_locations [N, Lq, M, L, P, 2],
  attention_weights [N, Lq, M, L, P] (float or half, as value); output [N, Lq, M, D], reshaped here to
  [N, Lq, M * D] as the op returns it. Only TensorRT runs such a file.

The exporter traces the translation functions with symbolic tensors: L, M, D and P are static there; image-sized
dimensions are not. (Their arguments carry no type hints: the exporter reads a translation function's annotations
as its ONNX signature.) onnx and onnxscript are imported only inside these functions and :func:`to_onnx`, so the
package works without them.
"""

import importlib
from typing import Callable, Dict

import torch
from torch.export import ExportedProgram

__all__ = ["ATTENTION_FORMS", "OPSET", "TRT_DOMAIN", "TRT_PLUGIN", "attention_translation", "require", "to_onnx"]

OPSET = 18  # GridSample needs >= 16; the exporter's own op library is written for 18
TRT_DOMAIN = "trt"
TRT_PLUGIN = "MultiscaleDeformableAttnPlugin_TRT"
# onnx.TensorProto data types, spelled out to keep `import onnx` out of module import
_INT32 = 6


def require(*modules: str) -> None:
    """Import the given packages, or raise ImportError naming those missing and how to install them."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"ONNX export needs {' and '.join(missing)}, not installed here. Install the pinned versions with "
            "`pip install -c requirements/constraints.txt -r requirements/export.txt`."
        )


def _grid_sample_attention(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """`ms_deform_attn` in standard ONNX ops (the inputs are the op's, see the module docstring)."""
    from onnxscript import opset18 as op

    num_levels = spatial_shapes.shape[0]
    head_dim = value.shape[3]
    num_points = sampling_locations.shape[4]

    def ints(*values: int):
        return op.Constant(value_ints=list(values))

    # grid_sample's [-1, 1] frame; [N, Lq, M, L, P, 2] -> [N, M, Lq, L, P, 2]
    grids = op.Sub(op.Mul(sampling_locations, op.Constant(value_float=2.0)), op.Constant(value_float=1.0))
    grids = op.Transpose(grids, perm=[0, 2, 1, 3, 4, 5])
    num_queries = op.Shape(grids, start=2, end=3)
    values = op.Transpose(value, perm=[0, 2, 3, 1])  # [N, M, D, S]
    sampled = []
    for level in range(num_levels):
        hw = op.Reshape(op.Gather(spatial_shapes, ints(level), axis=0), ints(2))  # (H_l, W_l)
        start = op.Gather(level_start_index, ints(level), axis=0)
        end = op.Add(start, op.ReduceProd(hw, keepdims=1))
        v = op.Slice(values, start, end, ints(3))  # [N, M, D, H_l * W_l]
        v = op.Reshape(v, op.Concat(ints(-1, head_dim), hw, axis=0))  # [N * M, D, H_l, W_l]
        g = op.Gather(grids, ints(level), axis=3)  # [N, M, Lq, 1, P, 2]
        g = op.Reshape(g, op.Concat(ints(-1), num_queries, ints(num_points, 2), axis=0))  # [N * M, Lq, P, 2]
        sampled.append(op.GridSample(v, g, mode="bilinear", padding_mode="zeros", align_corners=0))
    samples = op.Concat(*sampled, axis=3)  # [N * M, D, Lq, L * P], level-major like the weights
    # [N, Lq, M, L, P] -> [N, M, Lq, L, P] -> [N * M, 1, Lq, L * P]
    weights = op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4])
    weights = op.Reshape(weights, op.Concat(ints(-1, 1), num_queries, ints(num_levels * num_points), axis=0))
    out = op.ReduceSum(op.Mul(samples, weights), ints(3), keepdims=0)  # [N * M, D, Lq]
    out = op.Reshape(out, op.Concat(op.Shape(value, start=0, end=1), ints(-1), num_queries, axis=0))
    return op.Transpose(out, perm=[0, 2, 1])  # [N, Lq, M * D]


def _trt_plugin_schema():
    """The plugin's signature as an ONNX schema: the exporter builds every node from one, and ONNX has none for a
    TensorRT plugin."""
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    return OpSchema(
        TRT_PLUGIN,
        TRT_DOMAIN,
        1,
        inputs=[
            param("value", "T"),
            param("spatial_shapes", "tensor(int32)"),
            param("level_start_index", "tensor(int32)"),
            param("sampling_locations", "T"),
            param("attention_weights", "T"),
        ],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "what the plugin computes in")],
    )


def _trt_plugin_attention(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """`ms_deform_attn` as TensorRT's plugin node (see the module docstring)."""
    import onnx_ir as ir
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    plugin = Op(Opset(TRT_DOMAIN, 1), TRT_PLUGIN, _trt_plugin_schema())
    out = plugin(
        value,
        op.Cast(spatial_shapes, to=_INT32),
        op.Cast(level_start_index, to=_INT32),
        sampling_locations,
        attention_weights,
    )
    # ONNX shape inference knows nothing of the plugin: record what it returns, [N, Lq, M, D]
    out.dtype = value.dtype
    out.shape = ir.Shape([value.shape[0], sampling_locations.shape[1], value.shape[2], value.shape[3]])
    return op.Reshape(out, op.Constant(value_ints=[0, 0, -1]))


_ATTENTION: Dict[str, Callable] = {"grid_sample": _grid_sample_attention, "trt_plugin": _trt_plugin_attention}
ATTENTION_FORMS = tuple(_ATTENTION)


def attention_translation(attention: str) -> Dict[Callable, Callable]:
    """`torch.onnx.export`'s `custom_translation_table` writing the op in the given form (any model that calls it)."""
    if attention not in _ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION_FORMS}, got {attention!r}")
    return {torch.ops.sparse_detr.ms_deform_attn.default: _ATTENTION[attention]}


def to_onnx(
    program: ExportedProgram, attention: str = "grid_sample", optimize: bool = True
) -> "torch.onnx.ONNXProgram":
    """An ExportedProgram of :class:`ExportableSparseDETR` (:func:`export_program`) as an ONNX program (save it
    with `.save(path)`).

    Inputs: ``image`` [3, H, W] float32, any H and W over the coarsest stride (see :func:`export_program`).
    Outputs: ``boxes`` [D, 4], ``scores`` [D], ``classes`` [D] int64, as :class:`ExportableSparseDETR`.

    Args:
        program: the ExportedProgram. It can be translated once: the exporter's decomposition pass leaves it unable
            to be decomposed again (its data-dependent sizes, e.g. Sparse DETR's kept-token count, then show up as
            unbound symbols; a deep copy shares them), so export again for a second translation.
        attention: the form of the deformable attention, one of :data:`ATTENTION_FORMS`.
        optimize: run onnxscript's graph optimizer (constant folding, fusions); on a CPU it takes longer than the
            translation itself.
    """
    table = attention_translation(attention)
    require("onnx", "onnxscript")
    return torch.onnx.export(
        program,
        dynamo=True,
        opset_version=OPSET,
        input_names=["image"],
        output_names=["boxes", "scores", "classes"],
        custom_translation_table=table,
        optimize=optimize,
    )
