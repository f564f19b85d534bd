import pytest
import torch

from sparse_detr.modeling.token_selection import (
    ScoringNetwork,
    num_selected_tokens,
    select_top_rho_tokens,
)


def test_scoring_network_shapes_and_global_half():
    torch.manual_seed(0)
    net = ScoringNetwork(16, 16)
    x = torch.randn(2, 7, 16)
    scores = net(x)
    assert scores.shape == (2, 7)
    # half of the hidden channels are averaged over all tokens of the image (padding included)
    z = net.layer1(x)
    mixed = torch.cat([z[..., :8], z[..., 8:].mean(1, keepdim=True).expand(-1, 7, -1)], -1)
    assert torch.allclose(scores, net.layer2(mixed).squeeze(-1), atol=1e-6)
    assert not torch.allclose(scores, net.layer2(z).squeeze(-1), atol=1e-4)
    with pytest.raises(ValueError, match="divisible by 4"):
        ScoringNetwork(16, 18)


def test_counts_are_int_valid_times_rho_plus_one():
    valid = torch.tensor([100, 37, 9, 1])
    assert num_selected_tokens(valid, 0.1).tolist() == [int(v * 0.1) + 1 for v in valid.tolist()]
    assert num_selected_tokens(valid, 0.3).tolist() == [int(v * 0.3) + 1 for v in valid.tolist()]
    # rho = 1 keeps every valid token and no more
    assert num_selected_tokens(valid, 1.0).tolist() == valid.tolist()


def test_padded_tokens_are_never_selected_even_in_ties():
    # every score equal: only the padding decides, and padded tokens must lose every tie
    scores = torch.zeros(3, 12)
    padding = torch.zeros(3, 12, dtype=torch.bool)
    padding[0, :5] = True  # padded tokens first, where a stable sort would prefer them
    padding[1, 6:] = True
    selection = select_top_rho_tokens(scores, padding, rho=0.9)
    inds, num_kept = selection.indices, selection.num_kept
    assert num_kept.tolist() == [int(7 * 0.9) + 1, int(6 * 0.9) + 1, int(12 * 0.9) + 1]
    assert inds.shape == (3, int(num_kept.max()))
    kept = selection.keep_mask()
    assert not (kept & padding).any()
    assert kept.sum(1).tolist() == num_kept.tolist()


def test_selection_is_sorted_by_score_and_capped_at_the_token_count():
    torch.manual_seed(0)
    scores = torch.randn(2, 10)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    selection = select_top_rho_tokens(scores, padding, rho=1.0)
    inds, num_kept = selection.indices, selection.num_kept
    assert selection.scores is scores
    assert inds.shape == (2, 10) and num_kept.tolist() == [10, 10]
    assert torch.equal(inds, scores.argsort(1, descending=True))
