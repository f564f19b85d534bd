"""Sparse DETR's token selection: the scoring network and the per-image top-rho choice of encoder queries."""
from typing import Tuple

import torch
from torch import Tensor, nn


class MaskPredictor(nn.Module):
    """The scoring network: one saliency logit per encoder token.

    LayerNorm -> Linear -> GELU, then half of the channels stay per token and the other half is averaged over all
    tokens of the image (padding included, as the reference) to give every token global context, then a 3-layer
    MLP (d -> d/2 -> d/4 -> 1, GELU).

    Args:
        in_dim: channels of the input tokens.
        h_dim: hidden channels (even; the reference uses in_dim).
    """

    def __init__(self, in_dim: int, h_dim: int):
        super().__init__()
        if h_dim % 4 != 0:
            raise ValueError(f"MaskPredictor h_dim must be divisible by 4, got {h_dim}")
        self.h_dim = h_dim
        self.layer1 = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, h_dim), nn.GELU())
        self.layer2 = nn.Sequential(
            nn.Linear(h_dim, h_dim // 2),
            nn.GELU(),
            nn.Linear(h_dim // 2, h_dim // 4),
            nn.GELU(),
            nn.Linear(h_dim // 4, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, S, in_dim] -> logits [N, S]"""
        z = self.layer1(x)
        z_local, z_global = z.split(self.h_dim // 2, dim=-1)
        z_global = z_global.mean(dim=1, keepdim=True).expand_as(z_local)
        return self.layer2(torch.cat([z_local, z_global], dim=-1)).squeeze(-1)


def num_selected_tokens(valid_counts: Tensor, rho: float) -> Tensor:
    """Tokens each image keeps: int(valid_tokens * rho) + 1 (in float32, as the reference), at most valid_tokens.

    The cap only matters at rho = 1, where the reference would also keep one padded token.

    valid_counts: [N] long -> [N] long
    """
    return torch.minimum((valid_counts * rho).long() + 1, valid_counts)


def select_top_rho_tokens(scores: Tensor, padding_mask: Tensor, rho: float) -> Tuple[Tensor, Tensor]:
    """Per image, the indices of its highest-scoring tokens.

    All images get the same number K of indices (the largest per-image count, at most S) so they stack; image i
    keeps only the first `num_kept[i]` of them. Padded tokens rank below every valid token, ties included, so they are never
    among the kept ones. (The reference fills them with the batch minimum, which ties with
    the lowest valid score; -inf keeps the order of all valid tokens and breaks that tie towards the valid one.)

    Args:
        scores: [N, S] saliency logits.
        padding_mask: [N, S] bool, True on padded tokens.
        rho: keeping ratio in (0, 1].
    Returns:
        topk_inds: [N, K] long, sorted by decreasing score.
        num_kept: [N] long, see :func:`num_selected_tokens`.
    """
    num_kept = num_selected_tokens((~padding_mask).sum(dim=1), rho)
    # one host sync: topk needs K as a Python int
    k = min(int(num_kept.max()), scores.shape[1])
    ranked = scores.detach().masked_fill(padding_mask, float("-inf"))
    topk_inds = ranked.topk(k, dim=1).indices
    return topk_inds, num_kept


def keep_mask(topk_inds: Tensor, num_kept: Tensor, num_tokens: int) -> Tensor:
    """[N, num_tokens] bool, True on the first num_kept[i] tokens of topk_inds[i]."""
    kept = torch.arange(topk_inds.shape[1], device=topk_inds.device)[None] < num_kept[:, None]
    return torch.zeros(
        topk_inds.shape[0], num_tokens, dtype=torch.bool, device=topk_inds.device
    ).scatter(1, topk_inds, kept)
