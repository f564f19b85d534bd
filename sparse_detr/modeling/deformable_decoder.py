"""Deformable decoder: query self-attention, deformable cross-attention to the encoder memory, optional iterative
box refinement."""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..layers.box_ops import apply_box_delta
from ..layers.ffn import ffn_modules, post_norm_ffn
from ..layers.multi_scale_deform_attn import MSDeformAttn, UnprojectedValue
from .layer_stack import LayerStack
from .levels import FlatLevels

__all__ = ["DecoderOutput", "DeformableDecoderLayer", "DeformableDecoder"]


@dataclass
class DecoderOutput:
    """What the decoder layers computed.

    Attributes:
        hs: [num_layers, N, Q, C] output of every layer.
        references: per layer, the reference it got, [N, Q, 2] points or [N, Q, 4] boxes, normalized by the valid
            image area (its box predictions are deltas on it); point references become boxes after the first
            refinement.
        sampling_locations: per layer [N, Q, M, L, P, 2] of its cross-attention (Sparse DETR's DAM is built from
            them and the attention weights).
        attention_weights: per layer [N, Q, M, L, P].
    """

    hs: Tensor
    references: List[Tensor]
    sampling_locations: List[Tensor]
    attention_weights: List[Tensor]


class DeformableDecoderLayer(nn.Module):
    """Self-attention among the queries, deformable cross-attention to the memory, FFN; post-norm, ReLU.

    Args:
        d_model: channels.
        d_ffn: FFN hidden channels.
        dropout: dropout in attention and after every block.
        n_levels, n_heads, n_points: see :class:`MSDeformAttn` (n_heads also for the self-attention).
    """

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        # sequence-first with need_weights (the default): the plain matmul/softmax path, which FLOP counters see
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1, self.dropout3, self.linear2, self.dropout4, self.norm3 = ffn_modules(d_model, d_ffn, dropout)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Union[Tensor, UnprojectedValue],
        levels: FlatLevels,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            tgt: [N, Q, C] query features.
            query_pos: [N, Q, C] query position embedding.
            reference_points: [N, Q, L, 2 or 4] in each level's padded frame.
            memory: [N, S, C] encoder output (or as an :class:`UnprojectedValue`, see :class:`MSDeformAttn`).
            levels: the layout of the memory's tokens (shapes, start indices, padding mask).
        Returns:
            tgt: [N, Q, C]
            sampling_locations: [N, Q, M, L, P, 2], attention_weights: [N, Q, M, L, P] of the cross-attention.
        """
        q = (tgt + query_pos).transpose(0, 1)
        attn = self.self_attn(q, q, tgt.transpose(0, 1))[0].transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(attn))

        attn, sampling_locations, attention_weights = self.cross_attn(
            tgt + query_pos,
            reference_points,
            memory,
            levels.spatial_shapes,
            levels.level_start_index,
            levels.padding_mask,
        )
        tgt = self.norm1(tgt + self.dropout1(attn))

        tgt = post_norm_ffn(tgt, self.linear1, self.dropout3, self.linear2, self.dropout4, self.norm3)
        return tgt, sampling_locations, attention_weights


class DeformableDecoder(LayerStack):
    """A stack of :class:`DeformableDecoderLayer` (constructor: see :class:`LayerStack`)."""

    layer_type = DeformableDecoderLayer
    config_prefix = "DEC"

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        levels: FlatLevels,
        bbox_heads: Optional[Sequence[nn.Module]] = None,
        sample_then_project: bool = False,
    ) -> DecoderOutput:
        """
        Args:
            tgt: [N, Q, C] initial query features.
            query_pos: [N, Q, C]
            reference_points: [N, Q, 2] points or [N, Q, 4] boxes (cxcywh), normalized by the valid image area.
            memory: [N, S, C]
            levels: the layout of the memory's tokens.
            bbox_heads: per layer, a head predicting box deltas in logit space from that layer's output; given,
                each layer's reference becomes the refined (detached) box of the previous one.
            sample_then_project: the cross-attention samples the memory before projecting it (an
                :class:`UnprojectedValue` built once for all layers): the same output with far fewer FLOPs, for
                inference (training keeps the projection the reference computes).
        """
        if sample_then_project:
            memory = UnprojectedValue.of(memory, levels.padding_mask)
        valid_ratios = levels.valid_ratios
        hs, references, sampling_locations, attention_weights = [], [], [], []
        output = tgt
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ref_input = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                ref_input = reference_points[:, :, None] * valid_ratios[:, None]
            references.append(reference_points)
            output, locations, weights = layer(output, query_pos, ref_input, memory, levels)
            hs.append(output)
            sampling_locations.append(locations)
            attention_weights.append(weights)
            if bbox_heads is not None:
                reference_points = apply_box_delta(bbox_heads[lid](output), reference_points).sigmoid().detach()
        return DecoderOutput(torch.stack(hs), references, sampling_locations, attention_weights)
