"""Multi-scale deformable attention core: the compiled op and its pure-PyTorch reference, same signature.

PLACEHOLDER until the compiled op lands: `ms_deform_attn` calls the reference.
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_available() -> bool:
    """True when the compiled extension `sparse_detr._C` is loaded."""
    return False


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Reference built on `grid_sample` (bilinear, zeros outside the map, align_corners=False).

    Args:
        value: [N, S, M, D]
        spatial_shapes: [L, 2] as (H, W); sum of H*W == S
        level_start_index: [L]
        sampling_locations: [N, Lq, M, L, P, 2] normalized (x, y)
        attention_weights: [N, Lq, M, L, P]
    Returns:
        [N, Lq, M*D]
    """
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes: List[List[int]] = spatial_shapes.tolist()
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lid, (h, w) in enumerate(shapes):
        # [N, h*w, M, D] -> [N*M, D, h, w]
        v = value_list[lid].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N, Lq, M, L, P] -> [N*M, 1, Lq, L*P]
    w = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * w).sum(-1).view(N, M * D, Lq)
    return out.transpose(1, 2).contiguous()


ms_deform_attn = ms_deform_attn_pytorch
