"""ONNX export: onnxruntime on the CPU agrees with eager PyTorch for the tiny paper variants on two image sizes;
the op's two ONNX forms (GridSample, TensorRT's plugin node) are checked on the op alone."""

import pytest
import torch
from export_cases import SIZES, random_image
from torch import nn

from sparse_detr.export import compare, eager_detections
from sparse_detr.layers import ms_deform_attn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from sparse_detr.export.onnx import OPSET, TRT_DOMAIN, TRT_PLUGIN, attention_translation, to_onnx  # noqa: E402
from sparse_detr.export.verify import onnxruntime_runner  # noqa: E402

N, M, D, L, P = 1, 2, 8, 3, 2
LEVELS = ((6, 7), (3, 4), (2, 2))


class _Op(nn.Module):
    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _op_inputs(levels=LEVELS, num_queries=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    S = int(shapes.prod(1).sum())
    return (
        torch.randn(N, S, M, D, generator=g),
        shapes,
        starts,
        # some locations outside the map: zero padding must match
        torch.rand(N, num_queries, M, L, P, 2, generator=g) * 1.4 - 0.2,
        torch.rand(N, num_queries, M, L, P, generator=g).softmax(-1),
    )


def _export_op(path, attention):
    """The op alone with dynamic S and Lq, in the given ONNX form."""
    S, Lq = torch.export.Dim("S", min=4), torch.export.Dim("Lq", min=2)
    program = torch.export.export(_Op(), _op_inputs(), dynamic_shapes=({1: S}, None, None, {1: Lq}, {1: Lq}))
    torch.onnx.export(
        program,
        dynamo=True,
        opset_version=OPSET,
        optimize=False,
        custom_translation_table=attention_translation(attention),
    ).save(str(path))
    return onnx.load(str(path))


def test_grid_sample_form_computes_the_op(tmp_path):
    path = tmp_path / "op.onnx"
    graph = _export_op(path, "grid_sample").graph
    assert sum(n.op_type == "GridSample" for n in graph.node) == L
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    # other level sizes and query counts than the traced ones: read at run time
    for levels, queries in ((LEVELS, 5), (((9, 5), (5, 3), (3, 2)), 11)):
        inputs = _op_inputs(levels, queries, seed=1)
        (out,) = session.run(None, dict(zip(names, (x.numpy() for x in inputs))))
        torch.testing.assert_close(torch.from_numpy(out), ms_deform_attn(*inputs), rtol=1e-5, atol=1e-6)


def test_tensorrt_plugin_form(tmp_path):
    model = _export_op(tmp_path / "op_trt.onnx", "trt_plugin")
    assert any(o.domain == TRT_DOMAIN for o in model.opset_import)
    graph = onnx.shape_inference.infer_shapes(model).graph
    (node,) = [n for n in graph.node if n.op_type == TRT_PLUGIN]
    assert node.domain == TRT_DOMAIN and not any(n.op_type == "GridSample" for n in graph.node)
    types = {v.name: v.type.tensor_type for v in list(graph.value_info) + list(graph.input) + list(graph.output)}

    def described(name):
        t = types[name]
        return t.elem_type, [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]

    float32, int32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    value, shapes, starts, locations, weights = (described(name) for name in node.input)
    # the plugin's order and types: value [N, S, M, D], the level tables int32 [L, 2] and [L], locations
    # [N, Lq, M, L, P, 2], weights [N, Lq, M, L, P] (S and Lq dynamic)
    assert value[0] == float32 and value[1][0] == N and value[1][2:] == [M, D] and isinstance(value[1][1], str)
    assert shapes == (int32, [L, 2]) and starts == (int32, [L])
    assert locations[0] == float32 and locations[1][2:] == [M, L, P, 2] and isinstance(locations[1][1], str)
    assert weights[0] == float32 and weights[1][1:] == [locations[1][1], M, L, P]
    # the plugin's output [N, Lq, M, D], then the op's [N, Lq, M * D]
    assert described(node.output[0]) == (float32, [N, locations[1][1], M, D])
    assert described(graph.output[0].name)[1][2] == M * D
    # the level tables come from the op's int64 inputs through a Cast
    producers = {o: n for n in graph.node for o in n.output}
    assert all(producers[name].op_type == "Cast" for name in node.input[1:3])


# the sparse variant's onnxruntime parity is checked through the tool, which exports and verifies it
# (test_export_tool.py): each translation to ONNX takes a while
@pytest.mark.slow
@pytest.mark.parametrize("exported", ["bbr_two_stage"], indirect=True)
def test_onnxruntime_matches_eager(exported, tmp_path):
    _, model, program = exported
    path = tmp_path / "model.onnx"
    # without the graph optimizer (minutes on a small CPU; it changes only speed): the tool runs it by default,
    # and the recorded R50 parity was measured on its output
    to_onnx(program, attention="grid_sample", optimize=False).save(str(path))
    graph = onnx.load(str(path)).graph
    T = model.transformer
    assert (
        sum(n.op_type == "GridSample" for n in graph.node)
        == (T.encoder.num_layers + T.decoder.num_layers) * T.num_feature_levels
    )
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == ["boxes", "scores", "classes"]
    run = onnxruntime_runner(str(path), threads=1)
    for seed, size in enumerate(SIZES):
        image = random_image(*size, seed=seed + 3)
        parity = compare(eager_detections(model, image), run(image))
        assert parity.within_tolerance, (size, parity)


def test_bad_attention_form():
    with pytest.raises(ValueError, match="attention must be one of"):
        attention_translation("cuda")
