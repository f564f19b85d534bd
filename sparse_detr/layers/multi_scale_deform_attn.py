"""The multi-scale deformable attention module (Deformable DETR), returning its sampling pattern as well.

(The file is not called `ms_deform_attn.py`: `sparse_detr.layers.ms_deform_attn` is the op function, and a submodule
of that name would shadow it on the package.)
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ms_deform_attn_op import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Each query attends, per head and per level, to `n_points` locations around its reference point.

    Offsets and attention weights are linear in the query; the values are bilinearly sampled from every level.
    The forward also returns the sampling locations and attention weights: Sparse DETR builds its decoder
    attention map (DAM) from them.

    Args:
        d_model: channels of queries and values.
        n_levels: number of feature levels.
        n_heads: attention heads; d_model must be divisible by it.
        n_points: sampling points per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"MSDeformAttn: d_model ({d_model}, MODEL.SPARSE_DETR.HIDDEN_DIM) must be divisible by n_heads "
                f"({n_heads}, MODEL.SPARSE_DETR.NHEADS)"
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start as a fixed star: head h points in direction 2*pi*h/n_heads (scaled so the larger of |x|,
        |y| is 1), point p at distance p + 1; attention starts uniform."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True)[0]
        distances = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        # [n_heads, n_levels, n_points, 2]
        grid = directions[:, None, None, :] * distances[None, None, :, None]
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            query: [N, Lq, C]
            reference_points: [N, Lq, n_levels, 2] normalized (x, y), (0, 0) top-left and (1, 1) bottom-right of
                the padded map; or [N, Lq, n_levels, 4] boxes (cx, cy, w, h), offsets then scale with the box.
            value: [N, S, C] the flattened multi-level features, S = sum of H_l * W_l
            spatial_shapes: [n_levels, 2] long, (H_l, W_l)
            level_start_index: [n_levels] long, offset of each level in S
            padding_mask: [N, S] bool, True on padded tokens (their values are zeroed)
        Returns:
            output: [N, Lq, C]
            sampling_locations: [N, Lq, n_heads, n_levels, n_points, 2] normalized (x, y)
            attention_weights: [N, Lq, n_heads, n_levels, n_points], softmax over levels x points
        """
        N, Lq, _ = query.shape
        S = value.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points

        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)

        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P)
        weights = F.softmax(weights, -1).view(N, Lq, M, L, P)

        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level
            wh = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            locations = reference_points[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # offsets are relative to the box size: P points reach half the box
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end with 2 (points) or 4 (boxes), got shape {tuple(reference_points.shape)}"
            )
        # Under autocast the projections come out in half precision while the locations and the softmax stay in
        # float32. Run the op in the widest of the three rather than the narrowest: bf16 locations would be off
        # by up to half a pixel on a 130-wide level.
        dtype = torch.promote_types(torch.promote_types(value.dtype, locations.dtype), weights.dtype)
        output = ms_deform_attn(value.to(dtype), spatial_shapes, level_start_index, locations.to(dtype), weights.to(dtype))
        return self.output_proj(output), locations, weights
