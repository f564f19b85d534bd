"""Deformable encoder with Sparse DETR's sparse token update.

Dense (Deformable DETR): every token is a query and the output replaces all of them. Sparse (Sparse DETR): only the
selected tokens are queries; they still attend to all tokens (keys/values), and after each layer each image writes
back its first `num_kept` updated tokens into the full token map, which the next layer reads as values.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..layers.ffn import ffn_modules, post_norm_ffn
from ..layers.multi_scale_deform_attn import MSDeformAttn
from .heads import DetectionHead
from .layer_stack import LayerStack
from .levels import FlatLevels
from .structures import Prediction
from .token_selection import TokenSelection

__all__ = ["DeformableEncoderLayer", "DeformableEncoder", "gather_tokens", "scatter_sparse_tokens"]


def gather_tokens(x: Tensor, inds: Tensor) -> Tensor:
    """x: [N, S, C], inds: [N, K] -> x[n, inds[n, k]]: [N, K, C]"""
    return x.gather(1, inds[..., None].expand(-1, -1, x.shape[-1]))


def scatter_sparse_tokens(full: Tensor, tokens: Tensor, topk_inds: Tensor, kept: Tensor) -> Tensor:
    """Write updated tokens back into the token map, per image only those marked `kept`.

    Vectorized over the batch: the positions not kept are written their own current value, so one scatter serves
    all images (each row of topk_inds has distinct indices, so the scatter is deterministic).

    Args:
        full: [N, S, C] the token map.
        tokens: [N, K, C] updated tokens, token k of image n belongs at full[n, topk_inds[n, k]].
        topk_inds: [N, K] long.
        kept: [N, K] bool.
    Returns:
        [N, S, C] a new map.
    """
    index = topk_inds[..., None].expand(-1, -1, full.shape[-1])
    src = torch.where(kept[..., None], tokens, full.gather(1, index))
    return full.scatter(1, index, src)


class DeformableEncoderLayer(nn.Module):
    """Deformable attention of the queries over all tokens, then an FFN; post-norm, ReLU.

    Args:
        d_model: channels.
        d_ffn: FFN hidden channels.
        dropout: dropout after attention, inside and after the FFN.
        n_levels, n_heads, n_points: see :class:`MSDeformAttn`.
    """

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1, self.dropout2, self.linear2, self.dropout3, self.norm2 = ffn_modules(d_model, d_ffn, dropout)

    def forward(
        self, query: Tensor, query_pos: Tensor, reference_points: Tensor, value: Tensor, levels: FlatLevels
    ) -> Tensor:
        """
        Args:
            query: [N, Q, C] the tokens to update (all of them, or the selected ones).
            query_pos: [N, Q, C] their position + level embedding.
            reference_points: [N, Q, L, 2]
            value: [N, S, C] all tokens.
            levels: the layout of the value's tokens (shapes, start indices, padding mask).
        Returns:
            [N, Q, C] updated queries.
        """
        attn = self.self_attn(
            query + query_pos,
            reference_points,
            value,
            levels.spatial_shapes,
            levels.level_start_index,
            levels.padding_mask,
        )[0]
        query = self.norm1(query + self.dropout1(attn))
        return post_norm_ffn(query, self.linear1, self.dropout2, self.linear2, self.dropout3, self.norm2)


class DeformableEncoder(LayerStack):
    """A stack of :class:`DeformableEncoderLayer`, dense or sparse (constructor: see :class:`LayerStack`)."""

    layer_type = DeformableEncoderLayer
    config_prefix = "ENC"

    @staticmethod
    def get_reference_points(shapes: Sequence[Tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """The centre of every token, normalized by the valid (unpadded) extent of its own level, then mapped into
        each level's padded frame.

        Args:
            shapes: (H_l, W_l) of each level.
            valid_ratios: [N, L, 2] (w, h) share of each level not padded.
        Returns:
            [N, S, L, 2] normalized (x, y).
        """
        device = valid_ratios.device
        points = []
        for lvl, (h, w) in enumerate(shapes):
            ys = torch.arange(h, dtype=torch.float32, device=device) + 0.5
            xs = torch.arange(w, dtype=torch.float32, device=device) + 0.5
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        levels: FlatLevels,
        selection: Optional[TokenSelection] = None,
        aux_heads: Sequence[DetectionHead] = (),
        aux_proposals: Optional[Tensor] = None,
    ) -> Tuple[Tensor, List[Prediction]]:
        """
        Args:
            src: [N, S, C] flattened multi-level tokens.
            pos: [N, S, C] position + level embedding.
            levels: the layout of the tokens.
            selection: the tokens to update (sparse encoder); None updates all of them (dense encoder).
            aux_heads: heads applied to the queries after each layer but the last (the encoder aux loss), one per
                such layer; empty to skip.
            aux_proposals: [N, S, 4] unactivated anchor boxes of every token, the base of the aux box predictions
                (needed with aux_heads).
        Returns:
            memory: [N, S, C]
            aux_outputs: per layer but the last, the predictions on the Q queries of that layer (the K selected
                tokens, or all S); empty without aux heads.
        """
        reference_points = self.get_reference_points(levels.shapes, levels.valid_ratios)
        if selection is not None:
            topk_inds = selection.indices
            N, K = topk_inds.shape
            L = reference_points.shape[2]
            reference_points = gather_tokens(reference_points.flatten(2), topk_inds).view(N, K, L, 2)
            query = gather_tokens(src, topk_inds)
            query_pos = gather_tokens(pos, topk_inds)
            kept = selection.kept()
        else:
            query, query_pos = src, pos
        if aux_heads:
            if len(aux_heads) != self.num_layers - 1:
                raise ValueError(
                    f"aux_heads: one per encoder layer but the last ({self.num_layers - 1}), got {len(aux_heads)}"
                )
            if aux_proposals is None:
                raise ValueError("aux_heads need aux_proposals")
            if selection is not None:
                aux_proposals = gather_tokens(aux_proposals, selection.indices)

        output = src
        aux_outputs: List[Prediction] = []
        for lid, layer in enumerate(self.layers):
            query = layer(query, query_pos, reference_points, output, levels)
            output = query if selection is None else scatter_sparse_tokens(output, query, selection.indices, kept)
            if aux_heads and lid < self.num_layers - 1:
                head = aux_heads[lid]
                aux_outputs.append(Prediction(head.cls(query), (aux_proposals + head.box(query)).sigmoid()))
        return output, aux_outputs
