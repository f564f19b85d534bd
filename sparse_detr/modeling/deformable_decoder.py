"""Deformable decoder: query self-attention, deformable cross-attention to the encoder memory, optional iterative
box refinement (optionally with DINO's look-forward-twice gradients)."""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from detectron2.config import configurable
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
        references: per layer, the reference its box predictions are deltas on, [N, Q, 2] points or [N, Q, 4]
            boxes, normalized by the valid image area: the reference the layer got (point references become boxes
            after the first refinement). With look-forward-twice the same values, but a refined box keeps its
            gradient to the layer that refined it (the layers themselves got it detached).
        sampling_locations: per layer [N, Q, M, L, P, 2] of its cross-attention (Sparse DETR's DAM is built from
            them and the attention weights).
        attention_weights: per layer [N, Q, M, L, P].
    """

    hs: Tensor
    references: List[Tensor]
    sampling_locations: List[Tensor]
    attention_weights: List[Tensor]

    def split(self, num_first: int) -> Tuple["DecoderOutput", "DecoderOutput"]:
        """The outputs of the first `num_first` queries and of the others (e.g. denoising and matching queries)."""

        def parts(xs: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
            return [x[:, :num_first] for x in xs], [x[:, num_first:] for x in xs]

        (ref_a, ref_b), (loc_a, loc_b), (w_a, w_b) = map(
            parts, (self.references, self.sampling_locations, self.attention_weights)
        )
        first = DecoderOutput(self.hs[:, :, :num_first], ref_a, loc_a, w_a)
        return first, DecoderOutput(self.hs[:, :, num_first:], ref_b, loc_b, w_b)


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
        self_attn_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            tgt: [N, Q, C] query features.
            query_pos: [N, Q, C] query position embedding.
            reference_points: [N, Q, L, 2 or 4] in each level's padded frame.
            memory: [N, S, C] encoder output (or as an :class:`UnprojectedValue`, see :class:`MSDeformAttn`).
            levels: the layout of the memory's tokens (shapes, start indices, padding mask).
            self_attn_mask: [Q, Q] bool, True where query (row) must not attend to query (column); None: all
                attend to all.
        Returns:
            tgt: [N, Q, C]
            sampling_locations: [N, Q, M, L, P, 2], attention_weights: [N, Q, M, L, P] of the cross-attention.
        """
        q = (tgt + query_pos).transpose(0, 1)
        attn = self.self_attn(q, q, tgt.transpose(0, 1), attn_mask=self_attn_mask)[0].transpose(0, 1)
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
    """A stack of :class:`DeformableDecoderLayer`.

    Args:
        look_forward_twice: (with box refinement) DINO's look-forward-twice: each layer still gets the previous
            layer's refined box detached, but its predictions are deltas on the undetached box, so a layer's box
            loss also trains the previous layer's box head and its queries (MODEL.SPARSE_DETR.LOOK_FORWARD_TWICE).
            Forward values are the same either way; only gradients differ.
        the others: see :class:`LayerStack`.
    """

    layer_type = DeformableDecoderLayer
    config_prefix = "DEC"

    @configurable
    def __init__(self, num_layers: int, *, look_forward_twice: bool = False, **layer_args):
        super().__init__(num_layers, **layer_args)
        self.look_forward_twice = look_forward_twice

    @classmethod
    def from_config(cls, cfg):
        return {**super().from_config(cfg), "look_forward_twice": cfg.MODEL.SPARSE_DETR.LOOK_FORWARD_TWICE}

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        levels: FlatLevels,
        bbox_heads: Optional[Sequence[nn.Module]] = None,
        sample_then_project: bool = False,
        self_attn_mask: Optional[Tensor] = None,
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
            self_attn_mask: [Q, Q] bool, True where query (row) must not attend to query (column), in every layer's
                self-attention (the denoising queries' groups); None: all attend to all.
        """
        if sample_then_project:
            memory = UnprojectedValue.of(memory, levels.padding_mask)
        valid_ratios = levels.valid_ratios
        hs, references, sampling_locations, attention_weights = [], [], [], []
        output = tgt
        # the reference the predictions are deltas on: the layer's own, or with look-forward-twice the same box
        # before it was detached
        prediction_reference = reference_points
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ref_input = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                ref_input = reference_points[:, :, None] * valid_ratios[:, None]
            references.append(prediction_reference)
            output, locations, weights = layer(output, query_pos, ref_input, memory, levels, self_attn_mask)
            hs.append(output)
            sampling_locations.append(locations)
            attention_weights.append(weights)
            if bbox_heads is not None:
                refined = apply_box_delta(bbox_heads[lid](output), reference_points).sigmoid()
                reference_points = refined.detach()
                prediction_reference = refined if self.look_forward_twice else reference_points
        return DecoderOutput(torch.stack(hs), references, sampling_locations, attention_weights)
