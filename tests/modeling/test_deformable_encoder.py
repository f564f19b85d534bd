import pytest
import torch

from sparse_detr.modeling.deformable_encoder import DeformableEncoder, gather_tokens, scatter_sparse_tokens
from sparse_detr.modeling.heads import DetectionHead
from sparse_detr.modeling.levels import FlatLevels
from sparse_detr.modeling.token_selection import TokenSelection

SHAPES = [(4, 5), (2, 3)]
S = 26


def test_scatter_equals_a_per_image_loop():
    torch.manual_seed(0)
    full = torch.randn(3, S, 8)
    tokens = torch.randn(3, 6, 8)
    topk = torch.stack([torch.randperm(S)[:6] for _ in range(3)])
    num_kept = torch.tensor([6, 2, 0])
    kept = torch.arange(6)[None] < num_kept[:, None]
    expected = full.clone()
    for i in range(3):
        n = int(num_kept[i])
        expected[i, topk[i, :n]] = tokens[i, :n]
    assert torch.equal(scatter_sparse_tokens(full, tokens, topk, kept), expected)


def test_scatter_gradients_reach_only_the_written_tokens():
    full = torch.randn(1, S, 4, requires_grad=True)
    tokens = torch.randn(1, 3, 4, requires_grad=True)
    topk = torch.tensor([[5, 0, 9]])
    kept = torch.tensor([[True, True, False]])
    scatter_sparse_tokens(full, tokens, topk, kept).sum().backward()
    assert tokens.grad[0, :2].eq(1).all() and tokens.grad[0, 2].eq(0).all()
    assert full.grad[0, [5, 0]].eq(0).all() and full.grad[0, 9].eq(1).all()


def _inputs(padded: bool = True):
    torch.manual_seed(0)
    src, pos = torch.randn(2, S, 16), torch.randn(2, S, 16)
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in SHAPES]
    if padded:
        masks[0][1, :, 3:] = True
        masks[1][1, :, 2:] = True
    levels = FlatLevels.from_masks(masks)
    assert levels.level_start_index.tolist() == [0, 20] and levels.num_tokens == S
    return src, pos, levels


def _selection(topk, num_kept):
    return TokenSelection(scores=torch.zeros(topk.shape[0], S), indices=topk, num_kept=num_kept)


def test_reference_points_are_token_centres_of_the_valid_area():
    _, _, levels = _inputs()
    ref = DeformableEncoder.get_reference_points(SHAPES, levels.valid_ratios)
    assert ref.shape == (2, S, 2, 2)
    # token (row 1, col 2) of level 0 in the unpadded image: ((2.5) / 5, 1.5 / 4) in every level's frame
    assert torch.allclose(ref[0, 7], torch.tensor([[0.5, 0.375]] * 2))
    # padded image: level 0 keeps 3 of 5 columns, level 1 2 of 3; the point is the same pixel of level 0
    assert torch.allclose(ref[1, 7, 0], torch.tensor([0.5, 0.375]))


def test_sparse_encoder_with_every_token_selected_equals_the_dense_one():
    src, pos, levels = _inputs()
    torch.manual_seed(1)
    encoder = DeformableEncoder(2, d_model=16, d_ffn=32, dropout=0.0, n_levels=2, n_heads=2, n_points=2)
    dense, _ = encoder(src, pos, levels)
    # queries in a scrambled order: deformable attention treats queries independently
    topk = torch.stack([torch.randperm(S) for _ in range(2)])
    sparse, _ = encoder(src, pos, levels, _selection(topk, torch.tensor([S, S])))
    assert torch.allclose(sparse, dense, atol=1e-5)


def test_sparse_encoder_updates_only_the_kept_tokens_and_feeds_aux_heads():
    src, pos, levels = _inputs()
    encoder = DeformableEncoder(3, d_model=16, d_ffn=32, dropout=0.0, n_levels=2, n_heads=2, n_points=2)
    topk = torch.tensor([[3, 11, 7, 0], [1, 2, 20, 5]])
    num_kept = torch.tensor([4, 2])
    heads = [DetectionHead(torch.nn.Linear(16, 3), torch.nn.Linear(16, 4)) for _ in range(2)]
    torch.nn.init.zeros_(heads[0].box.weight)
    torch.nn.init.zeros_(heads[0].box.bias)
    proposals = torch.randn(2, S, 4)
    memory, aux = encoder(src, pos, levels, _selection(topk, num_kept), aux_heads=heads, aux_proposals=proposals)
    changed = (memory != src).any(-1)
    expected = torch.zeros(2, S, dtype=torch.bool)
    expected[0, [3, 11, 7, 0]] = True
    expected[1, [1, 2]] = True
    assert torch.equal(changed, expected)
    # one aux output per layer but the last, on all K queries
    assert len(aux) == 2
    logits, boxes = aux[0]
    assert logits.shape == (2, 4, 3) and boxes.shape == (2, 4, 4)
    # the aux boxes are deltas on the selected tokens' proposals (a zero head gives the proposals)
    assert torch.allclose(boxes, gather_tokens(proposals, topk).sigmoid())
    assert not torch.allclose(aux[1].boxes, boxes)
    with pytest.raises(ValueError, match="one per encoder layer but the last"):
        encoder(src, pos, levels, aux_heads=heads[:1], aux_proposals=proposals)
