"""The decoder's switches beyond the paper: the self-attention mask of DINO's denoising queries (matching queries
never see them, groups never see each other) and look-forward-twice (same values, other gradients)."""

import pytest
import torch

from sparse_detr.layers.box_ops import apply_box_delta
from sparse_detr.layers.mlp import MLP
from sparse_detr.modeling.deformable_decoder import DeformableDecoder
from sparse_detr.modeling.denoising import build_denoising_queries
from sparse_detr.modeling.levels import FlatLevels
from sparse_detr.modeling.structures import Target

D, LEVELS, SHAPES = 32, 2, [(4, 6), (2, 3)]
NUM_MATCHING = 5


def _decoder(num_layers=2, look_forward_twice=False) -> DeformableDecoder:
    torch.manual_seed(0)
    return DeformableDecoder(
        num_layers,
        look_forward_twice=look_forward_twice,
        d_model=D,
        d_ffn=64,
        dropout=0.0,
        n_levels=LEVELS,
        n_heads=2,
        n_points=2,
    )


def _box_heads(num_layers, seed=1):
    torch.manual_seed(seed)
    heads = [MLP(D, D, 4, 3) for _ in range(num_layers)]
    for head in heads:  # small non-zero deltas: the refined boxes move
        head.layers[-1].weight.data.mul_(0.1)
    return heads


def _memory_and_levels(seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = [torch.zeros(1, h, w, dtype=torch.bool) for h, w in SHAPES]
    masks[0][:, :, 5:] = True  # some padding
    levels = FlatLevels.from_masks(masks)
    return torch.randn(1, levels.num_tokens, D, generator=g), levels


def _queries(num, seed):
    g = torch.Generator().manual_seed(seed)
    centres = 0.2 + 0.6 * torch.rand(1, num, 2, generator=g)
    sizes = 0.1 + 0.2 * torch.rand(1, num, 2, generator=g)
    return torch.randn(1, num, D, generator=g), torch.randn(1, num, D, generator=g), torch.cat([centres, sizes], -1)


def _dn_mask(num_targets=2, dn_number=4):
    """The self-attention mask of 2 denoising groups of 2 positives + 2 negatives, and the group size."""
    target = Target(torch.zeros(num_targets, dtype=torch.long), torch.tensor([[0.5, 0.5, 0.2, 0.2]] * num_targets))
    dq = build_denoising_queries([target], 3, dn_number, 0.5, 1.0, NUM_MATCHING, torch.Generator().manual_seed(0))
    return dq.attn_mask, dq.num_queries, 2 * dq.max_targets


def _run(decoder, tgt, pos, ref, mask, heads):
    memory, levels = _memory_and_levels()
    return decoder(tgt, pos, ref, memory, levels, bbox_heads=heads, self_attn_mask=mask)


def _parts(out, start, stop):
    """Every output of queries start..stop-1, to compare bit for bit."""
    return [out.hs[:, :, start:stop]] + [
        x[:, start:stop] for xs in (out.references, out.sampling_locations, out.attention_weights) for x in xs
    ]


def test_matching_queries_and_other_groups_never_see_a_perturbed_group():
    """Perturbing one denoising group (content, position, box) changes that group's outputs only: the matching
    queries and the other group are bit for bit the same. Without the mask, the same perturbation reaches them."""
    mask, num_dn, group = _dn_mask()
    decoder, heads = _decoder(), _box_heads(2)
    tgt, pos, ref = _queries(num_dn + NUM_MATCHING, seed=0)
    base = _run(decoder, tgt, pos, ref, mask, heads)
    for g in range(num_dn // group):
        other_tgt, other_pos, other_ref = _queries(num_dn + NUM_MATCHING, seed=10 + g)
        rows = slice(g * group, (g + 1) * group)
        tgt2, pos2, ref2 = tgt.clone(), pos.clone(), ref.clone()
        tgt2[:, rows], pos2[:, rows], ref2[:, rows] = other_tgt[:, rows], other_pos[:, rows], other_ref[:, rows]
        perturbed = _run(decoder, tgt2, pos2, ref2, mask, heads)
        untouched = [(0, g * group), ((g + 1) * group, num_dn + NUM_MATCHING)]
        for start, stop in untouched:
            for a, b in zip(_parts(base, start, stop), _parts(perturbed, start, stop)):
                assert torch.equal(a, b)
        assert not torch.equal(base.hs[:, :, rows], perturbed.hs[:, :, rows])

        unmasked = _run(decoder, tgt, pos, ref, None, heads)
        unmasked_perturbed = _run(decoder, tgt2, pos2, ref2, None, heads)
        assert not torch.equal(unmasked.hs[:, :, num_dn:], unmasked_perturbed.hs[:, :, num_dn:])


def test_matching_queries_compute_what_they_compute_alone():
    """With denoising queries in front, the matching queries' outputs are those of a decoder run on them alone (to
    float rounding: the batched products have other shapes)."""
    mask, num_dn, _ = _dn_mask()
    decoder, heads = _decoder(), _box_heads(2)
    tgt, pos, ref = _queries(num_dn + NUM_MATCHING, seed=0)
    together = _run(decoder, tgt, pos, ref, mask, heads)
    dn, matching = together.split(num_dn)
    alone = _run(decoder, tgt[:, num_dn:], pos[:, num_dn:], ref[:, num_dn:], None, heads)
    assert dn.hs.shape == (2, 1, num_dn, D) and matching.hs.shape == (2, 1, NUM_MATCHING, D)
    torch.testing.assert_close(matching.hs, alone.hs, rtol=1e-5, atol=1e-5)
    for a, b in zip(matching.references + matching.sampling_locations, alone.references + alone.sampling_locations):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("look_forward_twice", [False, True])
def test_look_forward_twice_same_values_gradient_reaches_the_previous_box_head(look_forward_twice):
    """A layer's box loss trains the previous layer's box head only with look-forward-twice; the references (and so
    every prediction) have the same values either way, and the next layer always gets them detached."""
    heads = _box_heads(3)
    tgt, pos, ref = _queries(NUM_MATCHING, seed=0)
    plain = _run(_decoder(3), tgt, pos, ref, None, heads)
    out = _run(_decoder(3, look_forward_twice), tgt, pos, ref, None, heads)
    assert torch.equal(out.hs, plain.hs)
    assert all(torch.equal(a, b) for a, b in zip(out.references, plain.references))

    # the box loss of layer 2 only
    for head in heads:
        head.zero_grad(set_to_none=True)
    apply_box_delta(heads[2](out.hs[2]), out.references[2]).sigmoid().sum().backward()
    grads = [head.layers[-1].weight.grad for head in heads]
    assert grads[2] is not None and grads[2].abs().sum() > 0
    if look_forward_twice:
        assert grads[1] is not None and grads[1].abs().sum() > 0
    else:
        assert grads[1] is None
    # only one step back: layer 1's refined box reached layer 2 detached
    assert grads[0] is None
