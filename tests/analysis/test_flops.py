import logging

import pytest
import torch
from torch import nn

from sparse_detr.analysis.flops import MS_DEFORM_ATTN_OP, FlopCountAnalysis, ms_deform_attn_flop_jit
from sparse_detr.layers import ms_deform_attn, ms_deform_attn_available, ms_deform_attn_pytorch

# N, M, D, Lq, P and two levels of (H, W)
N, M, D, LQ, P = 2, 2, 4, 5, 3
SHAPES = [(6, 5), (3, 2)]


class _Core(nn.Module):
    """The smallest module that runs the deformable attention core, through `fn`."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, value, sampling_locations, attention_weights):
        spatial_shapes = torch.as_tensor(SHAPES, dtype=torch.long)
        level_start_index = torch.as_tensor([0, SHAPES[0][0] * SHAPES[0][1]], dtype=torch.long)
        return self.fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _inputs():
    g = torch.Generator().manual_seed(0)
    S, L = sum(h * w for h, w in SHAPES), len(SHAPES)
    value = torch.randn(N, S, M, D, generator=g)
    locations = torch.rand(N, LQ, M, L, P, 2, generator=g)
    weights = torch.rand(N, LQ, M, L, P, generator=g).softmax(-1)
    return value, locations, weights


# What fvcore counts for the grid_sample path: 4 per element of every level's output [N*M, D, Lq, P].
EXPECTED = 4 * N * M * D * LQ * P * len(SHAPES)


def _count(fn, caplog):
    caplog.set_level(logging.WARNING)
    flops = FlopCountAnalysis(_Core(fn), _inputs())
    total = flops.total()
    return flops, total


def test_grid_sample_path_is_counted_by_fvcore_default(caplog):
    flops, total = _count(ms_deform_attn_pytorch, caplog)
    assert flops.by_operator()["grid_sampler"] == EXPECTED
    # the weighted sum (mul, sum) is not counted
    assert total == EXPECTED


@pytest.mark.skipif(not ms_deform_attn_available(), reason="compiled sparse_detr._C not built")
def test_compiled_op_counted_like_grid_sample_path(caplog):
    flops, total = _count(ms_deform_attn, caplog)
    # only the op node is counted (no grid_sampler): the trace kept the custom op and the handle matched its name
    assert flops.by_operator() == {"ms_deform_attn": EXPECTED}
    assert total == EXPECTED
    assert MS_DEFORM_ATTN_OP not in flops.unsupported_ops()
    assert "ms_deform_attn" not in caplog.text


def test_handle_scales_with_every_dimension():
    class _Value:
        def __init__(self, shape):
            self.shape = shape

        def isCompleteTensor(self):
            return True

        def type(self):
            return self

        def sizes(self):
            return self.shape

    value, locations = _Value([2, 100, 8, 32]), _Value([2, 7, 8, 4, 3, 2])
    others = [_Value([4, 2]), _Value([4]), _Value([2, 7, 8, 4, 3])]
    inputs = [value, others[0], others[1], locations, others[2]]
    assert ms_deform_attn_flop_jit(inputs, []) == 4 * 2 * 7 * 8 * 4 * 3 * 32
    with pytest.raises(ValueError, match="sampling_locations"):
        ms_deform_attn_flop_jit([value, others[0], others[1], others[2], others[2]], [])
    with pytest.raises(ValueError, match="5 inputs"):
        ms_deform_attn_flop_jit(inputs[:3], [])


def test_a_model_prepared_for_inference_is_refused(tiny_cfg):
    """The fast path does less work for the same outputs; the FLOPs are those of the model as the paper defines it."""
    from detectron2.modeling import build_model

    from sparse_detr.analysis import random_input
    from sparse_detr.modeling import prepare_for_inference

    plain = build_model(tiny_cfg(WITH_BOX_REFINE=True, TWO_STAGE=True)).eval()
    inputs = [random_input(64, 96)]
    with torch.no_grad():
        assert FlopCountAnalysis(plain, inputs).total() > 0
        with pytest.raises(ValueError, match="prepared for inference"):
            FlopCountAnalysis(prepare_for_inference(plain), inputs)


def test_training_switches_leave_the_counted_inference_path_alone(tiny_cfg):
    """Denoising runs only in training and the scoring network's target only shapes its loss: the FLOPs counted on
    the inference path are the paper's model's."""
    from detectron2.modeling import build_model
    from paper_variants import DAM_DN, FOREGROUND, SPARSE_DETR

    from sparse_detr.analysis import random_input

    inputs = [random_input(64, 96)]
    counts = {}
    for name, variant in (("sparse", SPARSE_DETR), ("dn", DAM_DN), ("foreground", FOREGROUND)):
        torch.manual_seed(0)
        with torch.no_grad():
            flops = FlopCountAnalysis(build_model(tiny_cfg(**variant)).eval(), inputs)
            counts[name] = (flops.total(), flops.by_module()["model.transformer.decoder"])
    assert counts["sparse"][0] > 0 and counts["dn"] == counts["sparse"] == counts["foreground"]
