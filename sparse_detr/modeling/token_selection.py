"""Sparse DETR's token selection: the scoring network and the per-image top-rho choice of encoder queries."""

from dataclasses import dataclass

import torch
from detectron2.config import configurable
from torch import Tensor, nn

__all__ = ["ScoringNetwork", "TokenSelection", "num_selected_tokens", "select_top_rho_tokens", "keep_mask"]


class ScoringNetwork(nn.Module):
    """The scoring network: one saliency logit per encoder token.

    LayerNorm -> Linear -> GELU, then half of the channels stay per token and the other half is averaged over all
    tokens of the image (padding included, as the reference) to give every token global context, then a 3-layer
    MLP (d -> d/2 -> d/4 -> 1, GELU). (The reference calls it MaskPredictor; its parameters keep the reference's
    names, `transformer.enc_mask_predictor.*`, so released checkpoints load.)

    Args:
        in_dim: channels of the input tokens.
        h_dim: hidden channels, divisible by 4 (the reference uses in_dim).
    """

    @configurable
    def __init__(self, in_dim: int, h_dim: int):
        super().__init__()
        if h_dim % 4 != 0:
            raise ValueError(f"ScoringNetwork: h_dim must be divisible by 4, got {h_dim}")
        self.h_dim = h_dim
        self.layer1 = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, h_dim), nn.GELU())
        self.layer2 = nn.Sequential(
            nn.Linear(h_dim, h_dim // 2),
            nn.GELU(),
            nn.Linear(h_dim // 2, h_dim // 4),
            nn.GELU(),
            nn.Linear(h_dim // 4, 1),
        )

    @classmethod
    def from_config(cls, cfg):
        hidden_dim = cfg.MODEL.SPARSE_DETR.HIDDEN_DIM
        return {"in_dim": hidden_dim, "h_dim": hidden_dim}

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, S, in_dim] -> logits [N, S]"""
        z = self.layer1(x)
        z_local, z_global = z.split(self.h_dim // 2, dim=-1)
        z_global = z_global.mean(dim=1, keepdim=True).expand_as(z_local)
        return self.layer2(torch.cat([z_local, z_global], dim=-1)).squeeze(-1)


@dataclass
class TokenSelection:
    """The encoder tokens Sparse DETR updates, per image.

    Attributes:
        scores: [N, S] scoring-network logits of every token.
        indices: [N, K] long, the K highest-scoring tokens of each image, by decreasing score; K is the largest
            per-image count, so that the images stack.
        num_kept: [N] long, image i updates only the first num_kept[i] of its indices.
    """

    scores: Tensor
    indices: Tensor
    num_kept: Tensor

    def kept(self) -> Tensor:
        """[N, K] bool, True on the indices image i updates."""
        return torch.arange(self.indices.shape[1], device=self.indices.device)[None] < self.num_kept[:, None]

    def keep_mask(self) -> Tensor:
        """[N, S] bool, True on the updated tokens."""
        return keep_mask(self.indices, self.num_kept, self.scores.shape[1])


def num_selected_tokens(valid_counts: Tensor, rho: float) -> Tensor:
    """Tokens each image keeps: int(valid_tokens * rho) + 1 (in float32, as the reference), at most valid_tokens.

    The cap only matters at rho = 1, where the reference would also keep one padded token.

    valid_counts: [N] long -> [N] long
    """
    return torch.minimum((valid_counts * rho).long() + 1, valid_counts)


def select_top_rho_tokens(scores: Tensor, padding_mask: Tensor, rho: float) -> TokenSelection:
    """Per image, the indices of its highest-scoring tokens.

    Padded tokens rank below every valid token, ties included, so they are never among the kept ones. (The
    reference fills them with the batch minimum, which ties with the lowest valid score; -inf keeps the order of
    all valid tokens and breaks that tie towards the valid one.)

    Args:
        scores: [N, S] saliency logits.
        padding_mask: [N, S] bool, True on padded tokens.
        rho: keeping ratio in (0, 1].
    Returns:
        the selection; num_kept is :func:`num_selected_tokens` of the valid tokens.
    """
    num_kept = num_selected_tokens((~padding_mask).sum(dim=1), rho)
    # One host sync: topk needs K as a Python int (K <= S: num_kept <= valid tokens). Under torch.export K stays a
    # data-dependent size of the graph, computed from the image size as in eager mode; the check tells the tracer
    # it is a positive size.
    k = num_kept.max().item()
    torch._check(k >= 1)
    ranked = scores.detach().masked_fill(padding_mask, float("-inf"))
    return TokenSelection(scores=scores, indices=ranked.topk(k, dim=1).indices, num_kept=num_kept)


def keep_mask(indices: Tensor, num_kept: Tensor, num_tokens: int) -> Tensor:
    """[N, num_tokens] bool, True on the first num_kept[i] tokens of indices[i] ([N, K])."""
    kept = torch.arange(indices.shape[1], device=indices.device)[None] < num_kept[:, None]
    return torch.zeros(indices.shape[0], num_tokens, dtype=torch.bool, device=indices.device).scatter(1, indices, kept)
