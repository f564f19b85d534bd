import pytest
import torch

from sparse_detr.layers import ms_deform_attn_pytorch
from sparse_detr.layers.multi_scale_deform_attn import MSDeformAttn

SHAPES = torch.tensor([[4, 6], [2, 3]])
START = torch.tensor([0, 24])
S = 24 + 6


def _module(**kw) -> MSDeformAttn:
    torch.manual_seed(0)
    return MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3, **kw)


def test_initial_offsets_form_a_star_and_attention_is_uniform():
    m = _module()
    bias = m.sampling_offsets.bias.view(4, 2, 3, 2)
    # head h points along angle 2*pi*h/4, normalized so max(|x|, |y|) = 1, point p at distance p + 1
    assert torch.allclose(bias[1, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6)
    assert torch.allclose(bias[2, 1, 2], torch.tensor([-3.0, 0.0]), atol=1e-6)
    assert torch.equal(bias[:, 0], bias[:, 1])
    assert m.sampling_offsets.weight.abs().sum() == 0
    q = torch.randn(1, 5, 16)
    ref = torch.rand(1, 5, 2, 2)
    _, _, weights = m(q, ref, torch.randn(1, S, 16), SHAPES, START)
    assert torch.allclose(weights, torch.full_like(weights, 1 / 6))


def test_sampling_locations_and_output_match_the_formula():
    m = _module()
    with torch.no_grad():
        m.sampling_offsets.weight.normal_()
        m.attention_weights.weight.normal_()
    q, value = torch.randn(2, 5, 16), torch.randn(2, S, 16)
    ref = torch.rand(2, 5, 2, 2)
    out, loc, weights = m(q, ref, value, SHAPES, START)
    offsets = m.sampling_offsets(q).view(2, 5, 4, 2, 3, 2)
    wh = torch.tensor([[6.0, 4.0], [3.0, 2.0]])
    expected = ref[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    assert torch.allclose(loc, expected, atol=1e-6)
    assert torch.allclose(weights.sum((-1, -2)), torch.ones(2, 5, 4), atol=1e-6)
    v = m.value_proj(value).view(2, S, 4, 4)
    assert torch.allclose(out, m.output_proj(ms_deform_attn_pytorch(v, SHAPES, START, loc, weights)), atol=1e-5)

    boxes = torch.cat([ref, torch.full_like(ref, 0.5)], -1)
    _, loc_box, _ = m(q, boxes, value, SHAPES, START)
    # box references: offsets are fractions of the box, n_points of them reach half its size
    assert torch.allclose(loc_box, ref[:, :, None, :, None, :] + offsets / 3 * 0.5 * 0.5, atol=1e-6)


def test_padded_values_do_not_matter():
    m = _module()
    q, value = torch.randn(1, 5, 16), torch.randn(1, S, 16)
    ref = torch.rand(1, 5, 2, 2)
    padding = torch.zeros(1, S, dtype=torch.bool)
    padding[0, 20:24] = True
    out = m(q, ref, value, SHAPES, START, padding)[0]
    value2 = value.clone()
    value2[0, 20:24] = 1e3
    assert torch.allclose(m(q, ref, value2, SHAPES, START, padding)[0], out)
    assert not torch.allclose(m(q, ref, value2, SHAPES, START)[0], out)


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=4)
    m = _module()
    with pytest.raises(ValueError, match="reference_points"):
        m(torch.randn(1, 5, 16), torch.rand(1, 5, 2, 3), torch.randn(1, S, 16), SHAPES, START)


def test_runs_under_autocast_in_float32_with_the_eager_result():
    # autocast hands the op a bf16 value but float32 locations and weights; the module widens, not narrows
    m = _module()
    with torch.no_grad():
        m.sampling_offsets.weight.normal_()
    q, value, ref = torch.randn(1, 5, 16), torch.randn(1, S, 16), torch.rand(1, 5, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, loc, _ = m(q, ref, value, SHAPES, START)
    eager, eager_loc, _ = m(q, ref, value, SHAPES, START)
    assert torch.isfinite(out).all()
    assert loc.dtype == torch.float32
    # only the bf16 projections differ, not where the op samples
    assert torch.allclose(out.float(), eager, atol=0.1)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_sampling_before_projecting_gives_the_same_output(ref_dim):
    """UnprojectedValue: sample the tokens, then project (bias carried by the valid channel, padding zero)."""
    from sparse_detr.layers.multi_scale_deform_attn import UnprojectedValue

    m = _module()
    with torch.no_grad():
        m.sampling_offsets.weight.normal_()
        m.attention_weights.weight.normal_()
        m.value_proj.bias.normal_()  # a bias, so that the padded tokens' zeros matter
    q, value = torch.randn(2, 5, 16), torch.randn(2, S, 16)
    ref = torch.rand(2, 5, 2, ref_dim) * torch.tensor([1.0, 1.0, 0.5, 0.5])[:ref_dim]
    padding = torch.zeros(2, S, dtype=torch.bool)
    padding[1, 20:24] = padding[1, 28:] = True  # the second image is padded on both levels
    with torch.no_grad():
        expected, loc, weights = m(q, ref, value, SHAPES, START, padding)
        out, loc2, weights2 = m(q, ref, UnprojectedValue.of(value, padding), SHAPES, START)
        unpadded, _, _ = m(q, ref, UnprojectedValue.of(value, None), SHAPES, START)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(loc, loc2) and torch.equal(weights, weights2)
    torch.testing.assert_close(unpadded, m(q, ref, value, SHAPES, START)[0], rtol=1e-5, atol=1e-6)
