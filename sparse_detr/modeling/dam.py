"""The decoder attention map (DAM): where the decoder's cross-attention looks, on the flattened token grid.

Sparse DETR trains its scoring network to predict the top-rho tokens of the DAM, and reports how much of the DAM
mass falls on the tokens it selected (the "correlation").
"""

from typing import Sequence, Tuple

import torch
from torch import Tensor

from .token_selection import keep_mask

# (dx, dy) of the four bilinear neighbours relative to the floor of the sampling point
_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))


@torch.no_grad()
def attention_map_to_flat_grid(
    sampling_locations: Tensor,
    attention_weights: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    num_tokens: int,
) -> Tensor:
    """Splat every attention weight bilinearly onto the 4 tokens around its sampling point, summed over decoder
    layers, queries, heads, levels and points.

    The point is placed at pixel coordinates (x * W, y * H) -- without the -0.5 shift that `grid_sample` (and so
    the attention itself) uses -- because that is how the reference builds the DAM its scoring network is trained
    on; matching it keeps the targets, and so trained and converted models, identical. Neighbours outside the
    level are dropped. Only the top-k order of the DAM is ever used, so no gradient is kept.

    Args:
        sampling_locations: [N, n_layers, Q, M, L, P, 2] normalized (x, y).
        attention_weights: [N, n_layers, Q, M, L, P]
        spatial_shapes: [L, 2] long (H_l, W_l); level_start_index: [L] long.
        num_tokens: S = sum of H_l * W_l.
    Returns:
        [N, S] float32 (or the inputs' dtype if wider).
    """
    # half-precision pixel coordinates would be too coarse on large maps
    dtype = torch.promote_types(sampling_locations.dtype, torch.float32)
    N = sampling_locations.shape[0]
    wh = spatial_shapes.flip(-1)  # [L, 2] (W, H)
    xy = sampling_locations.to(dtype) * wh[:, None, :]
    floor = xy.floor().long()
    corners = torch.tensor(_CORNERS, dtype=torch.long, device=xy.device)
    # [..., L, P, 4, 2]
    neighbours = floor[..., None, :] + corners
    # a neighbour's bilinear weight is the area of the rectangle between the point and the opposite neighbour
    weights = (xy[..., None, :] - (floor[..., None, :] + (1 - corners))).prod(-1).abs()
    inside = ((neighbours >= 0) & (neighbours < wh[:, None, None, :])).all(-1)
    index = neighbours[..., 1] * wh[:, None, None, 0] + neighbours[..., 0] + level_start_index[:, None, None]
    contrib = torch.where(inside, attention_weights[..., None].to(dtype) * weights, 0.0)
    index = torch.where(inside, index, 0)
    dam = torch.zeros(N, num_tokens, dtype=dtype, device=xy.device)
    return dam.scatter_add_(1, index.reshape(N, -1), contrib.reshape(N, -1))


@torch.no_grad()
def dam_target(dam: Tensor, padding_mask: Tensor, num_kept: Tensor, k: int) -> Tensor:
    """The binary target of the scoring network: per image its num_kept[i] highest-DAM valid tokens.

    Args:
        dam: [N, S]
        padding_mask: [N, S] bool, True on padded tokens (ranked below every valid token).
        num_kept: [N] long.
        k: max(num_kept) capped at S (the selection's K).
    Returns:
        [N, S] float, 1 on target tokens.
    """
    top = dam.masked_fill(padding_mask, float("-inf")).topk(k, dim=1).indices
    return keep_mask(top, num_kept, dam.shape[1]).to(dam.dtype)


@torch.no_grad()
def dam_correlation(selected: Tensor, dam: Tensor, shapes: Sequence[Tuple[int, int]]) -> Tensor:
    """Share of the DAM mass on the selected tokens, averaged over the batch: overall, then per level.

    Args:
        selected: [N, S] 0/1 (or bool) selected tokens.
        dam: [N, S]
        shapes: (H_l, W_l) of each level.
    Returns:
        [1 + L]
    """
    hit = selected.to(dam.dtype) * dam
    ratios = [hit.sum(-1) / dam.sum(-1)]
    sizes = [h * w for h, w in shapes]
    for hit_l, dam_l in zip(hit.split(sizes, dim=1), dam.split(sizes, dim=1)):
        ratios.append(hit_l.sum(-1) / dam_l.sum(-1))
    return torch.stack(ratios).mean(-1)
