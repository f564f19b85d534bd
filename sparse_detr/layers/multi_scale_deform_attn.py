"""The multi-scale deformable attention module (Deformable DETR), returning its sampling pattern as well.

(The file is not called `ms_deform_attn.py`: `sparse_detr.layers.ms_deform_attn` is the op function, and a submodule
of that name would shadow it on the package.)
"""

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ms_deform_attn_op import ms_deform_attn

__all__ = ["MSDeformAttn", "UnprojectedValue"]


class UnprojectedValue(NamedTuple):
    """Values for :class:`MSDeformAttn` to sample before projecting them (see its forward).

    tokens: [N, S, 1, C + 1], the tokens with padded ones zeroed, then a channel that is 1 on valid tokens and 0 on
        padding: sampled with the rest, it carries the share of the projection's bias that the zero padding of the
        projected values would keep.
    """

    tokens: Tensor

    @classmethod
    def of(cls, value: Tensor, padding_mask: Optional[Tensor]) -> "UnprojectedValue":
        """value: [N, S, C] tokens; padding_mask: [N, S] bool, True on padded tokens (or None)."""
        valid = value.new_ones(value.shape[:2]) if padding_mask is None else (~padding_mask).to(value.dtype)
        tokens = value if padding_mask is None else value.masked_fill(padding_mask[..., None], 0.0)
        return cls(torch.cat([tokens, valid[..., None]], -1).unsqueeze(2))


class MSDeformAttn(nn.Module):
    """Each query attends, per head and per level, to `n_points` locations around its reference point.

    Offsets and attention weights are linear in the query; the values are bilinearly sampled from every level.
    The forward also returns the sampling locations and attention weights: Sparse DETR builds its decoder
    attention map (DAM) from them.

    Given an :class:`UnprojectedValue`, the forward samples the C-channel tokens and projects the samples instead
    (value_proj is linear and the sampling is a weighted sum, so the two orders agree to float rounding). Worth it
    where the queries sample fewer points than there are tokens: Deformable DETR's decoder, 300 queries x 8 heads x
    16 points against 18,549 tokens at 850x1040, skips a 256x256 projection of every token in every layer.

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
        value: Union[Tensor, UnprojectedValue],
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            query: [N, Lq, C]
            reference_points: [N, Lq, n_levels, 2] normalized (x, y), (0, 0) top-left and (1, 1) bottom-right of
                the padded map; or [N, Lq, n_levels, 4] boxes (cx, cy, w, h), offsets then scale with the box.
            value: [N, S, C] the flattened multi-level features, S = sum of H_l * W_l; or the same as an
                :class:`UnprojectedValue` (which holds the padding mask itself)
            spatial_shapes: [n_levels, 2] long, (H_l, W_l)
            level_start_index: [n_levels] long, offset of each level in S
            padding_mask: [N, S] bool, True on padded tokens (their values are zeroed); unused with an
                :class:`UnprojectedValue`
        Returns:
            output: [N, Lq, C]
            sampling_locations: [N, Lq, n_heads, n_levels, n_points, 2] normalized (x, y)
            attention_weights: [N, Lq, n_heads, n_levels, n_points], softmax over levels x points
        """
        N, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points

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
        if isinstance(value, UnprojectedValue):
            output = self._sample_then_project(value, spatial_shapes, level_start_index, locations, weights)
        else:
            output = self._project_then_sample(
                value, spatial_shapes, level_start_index, padding_mask, locations, weights
            )
        return self.output_proj(output), locations, weights

    def _project_then_sample(
        self,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Optional[Tensor],
        locations: Tensor,
        weights: Tensor,
    ) -> Tensor:
        """value [N, S, C] -> [N, Lq, C] (heads concatenated), before output_proj."""
        N, S, _ = value.shape
        value = self.value_proj(value)
        if padding_mask is not None:
            # in place on the fresh projection (its backward does not need it): one pass over [N, S, C] instead of
            # a copy and a pass, in every layer
            value = value.masked_fill_(padding_mask[..., None], 0.0)
        value = value.view(N, S, self.n_heads, self.d_model // self.n_heads)
        # Under autocast the projections come out in half precision while the locations and the softmax stay in
        # float32. Run the op in the widest of the three rather than the narrowest: bf16 locations would be off
        # by up to half a pixel on a 130-wide level.
        dtype = torch.promote_types(torch.promote_types(value.dtype, locations.dtype), weights.dtype)
        return ms_deform_attn(
            value.to(dtype), spatial_shapes, level_start_index, locations.to(dtype), weights.to(dtype)
        )

    def _sample_then_project(
        self,
        value: UnprojectedValue,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        locations: Tensor,
        weights: Tensor,
    ) -> Tensor:
        """The same as :meth:`_project_then_sample` from the unprojected tokens: every (query, head) samples all
        C + 1 channels as one single-head query of the op, then each head applies its rows of value_proj (weight
        and, on the carried valid channel, bias)."""
        N, Lq, M, L, P, _ = locations.shape
        D = self.d_model // M
        tokens = value.tokens
        dtype = torch.promote_types(torch.promote_types(tokens.dtype, locations.dtype), weights.dtype)
        samples = ms_deform_attn(
            tokens.to(dtype),
            spatial_shapes,
            level_start_index,
            locations.reshape(N, Lq * M, 1, L, P, 2).to(dtype),
            weights.reshape(N, Lq * M, 1, L, P).to(dtype),
        )  # [N, Lq * M, C + 1]
        # [M, D, C + 1]: head m's rows of the projection, its bias as the last column
        projection = torch.cat([self.value_proj.weight, self.value_proj.bias[:, None]], 1).view(M, D, -1)
        heads = torch.bmm(samples.view(N * Lq, M, -1).transpose(0, 1), projection.transpose(1, 2).to(dtype))
        return heads.transpose(0, 1).reshape(N, Lq, M * D)  # [M, N * Lq, D] -> [N, Lq, M * D]
