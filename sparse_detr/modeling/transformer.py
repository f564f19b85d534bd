"""The deformable transformer of Deformable DETR / Efficient DETR / Sparse DETR.

It takes the projected multi-level features and returns the decoder states; in between: flattening with level
embeddings, valid ratios, the token selection (Sparse DETR), the (sparse) encoder, the two-stage proposals from the
encoder output with top-k query initialization (Efficient DETR), and the decoder.

The detection heads are owned by the meta-architecture and passed in, in this order (the reference's):
[decoder layer 0 .. n-1, encoder proposals (two-stage), encoder layer 0 .. m-2 (encoder aux loss)].
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..layers.multi_scale_deform_attn import MSDeformAttn
from ..layers.position_encoding import sine_embedding
from .deformable_decoder import DeformableDecoder
from .deformable_encoder import DeformableEncoder, gather_tokens
from .token_selection import MaskPredictor, select_top_rho_tokens


def encoder_output_proposals(padding_mask: Tensor, shapes: Sequence[Tuple[int, int]]) -> Tuple[Tensor, Tensor]:
    """One anchor box per token: centred on the token, of side 0.05 * 2^level of the valid image area.

    Args:
        padding_mask: [N, S] bool, True on padded tokens.
        shapes: (H_l, W_l) of each level.
    Returns:
        proposals: [N, S, 4] unactivated (inverse sigmoid of cxcywh); +inf on padded tokens and on anchors with a
            coordinate outside (0.01, 0.99), so they become (1, 1, 1, 1) after a sigmoid.
        valid: [N, S, 1] bool, the anchor is inside (0.01, 0.99) in all four coordinates.
    """
    N = padding_mask.shape[0]
    proposals = []
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        mask = padding_mask[:, start:start + h * w].view(N, h, w)
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        ys = torch.arange(h, dtype=torch.float32, device=padding_mask.device)
        xs = torch.arange(w, dtype=torch.float32, device=padding_mask.device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([grid_x, grid_y], -1)
        scale = torch.stack([valid_w, valid_h], -1).view(N, 1, 1, 2)
        centres = (grid[None].expand(N, -1, -1, -1) + 0.5) / scale
        sizes = torch.full_like(centres, 0.05 * 2.0 ** lvl)
        proposals.append(torch.cat((centres, sizes), -1).view(N, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(padding_mask[..., None], float("inf")).masked_fill(~valid, float("inf"))
    return proposals, valid


def valid_ratio(mask: Tensor) -> Tensor:
    """mask: [N, H, W] bool, True on padding -> [N, 2] (w, h) share of the map covered by the image."""
    _, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / W, valid_h.float() / H], -1)


class DeformableTransformer(nn.Module):
    """
    Args:
        d_model: channels of the transformer.
        nhead: attention heads.
        num_encoder_layers, num_decoder_layers: depths.
        dim_feedforward: FFN hidden channels.
        dropout: dropout everywhere in the layers.
        num_feature_levels: levels of the input.
        enc_n_points, dec_n_points: sampling points per head and level.
        two_stage: decoder queries come from the top-scoring encoder proposals.
        num_queries: decoder queries; the number of proposals kept in two-stage mode.
        eff_query_init: (two-stage) Efficient DETR: the queries' content is the proposals' encoder features, their
            position embedding the proposals' box embedding.
        eff_specific_head: (two-stage) score proposals by their best class instead of class 0 (a binary head).
        token_selection: build the scoring network for the sparse encoder (Sparse DETR, needs two_stage: it
            shares the encoder-output projection).
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        two_stage: bool = False,
        num_queries: int = 300,
        eff_query_init: bool = False,
        eff_specific_head: bool = False,
        token_selection: bool = False,
    ):
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(
                f"MODEL.SPARSE_DETR.HIDDEN_DIM (d_model={d_model}) must be divisible by "
                f"MODEL.SPARSE_DETR.NHEADS (nhead={nhead})"
            )
        if num_encoder_layers < 1 or num_decoder_layers < 1:
            raise ValueError(
                "MODEL.SPARSE_DETR.ENC_LAYERS and DEC_LAYERS must be >= 1, got "
                f"{num_encoder_layers} and {num_decoder_layers}"
            )
        if num_queries < 1:
            raise ValueError(f"MODEL.SPARSE_DETR.NUM_QUERIES must be >= 1, got {num_queries}")
        for name, key, on in (
            ("eff_query_init", "EFF_QUERY_INIT", eff_query_init),
            ("eff_specific_head", "EFF_SPECIFIC_HEAD", eff_specific_head),
            ("token_selection", "RHO > 0", token_selection),
        ):
            if on and not two_stage:
                raise ValueError(
                    f"MODEL.SPARSE_DETR.{key} ({name}) needs MODEL.SPARSE_DETR.TWO_STAGE: it works on the "
                    "encoder-output proposals"
                )
        self.d_model = d_model
        self.num_feature_levels = num_feature_levels
        self.two_stage = two_stage
        self.num_queries = num_queries
        self.eff_query_init = eff_query_init
        self.eff_specific_head = eff_specific_head

        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.enc_mask_predictor = MaskPredictor(d_model, d_model) if token_selection else None
        layer_kwargs = dict(d_model=d_model, d_ffn=dim_feedforward, dropout=dropout, n_levels=num_feature_levels,
                            n_heads=nhead)
        self.encoder = DeformableEncoder(num_encoder_layers, n_points=enc_n_points, **layer_kwargs)
        self.decoder = DeformableDecoder(num_decoder_layers, n_points=dec_n_points, **layer_kwargs)
        if two_stage:
            # encoder tokens -> proposal features (shared with the scoring network's input)
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            # box embedding of the proposals -> query position (and content, without eff_query_init)
            query_dim = d_model if eff_query_init else 2 * d_model
            self.pos_trans = nn.Linear(2 * d_model, query_dim)
            self.pos_trans_norm = nn.LayerNorm(query_dim)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    @property
    def token_selection(self) -> bool:
        return self.enc_mask_predictor is not None

    def _project_tokens(self, tokens: Tensor, padding_mask: Tensor, proposal_valid: Tensor) -> Tensor:
        """enc_output + LayerNorm of the tokens, padded tokens and tokens without a valid anchor zeroed first."""
        tokens = tokens.masked_fill(padding_mask[..., None], 0.0).masked_fill(~proposal_valid, 0.0)
        return self.enc_output_norm(self.enc_output(tokens))

    def forward(
        self,
        srcs: List[Tensor],
        masks: List[Tensor],
        pos_embeds: List[Tensor],
        query_embed: Optional[Tensor],
        class_heads: Sequence[nn.Module],
        bbox_heads: Sequence[nn.Module],
        rho: float = 0.0,
        refine_boxes: bool = False,
        enc_aux: bool = False,
    ) -> Dict[str, Any]:
        """
        Args:
            srcs: per level [N, C, H_l, W_l] projected features.
            masks: per level [N, H_l, W_l] bool, True on padding.
            pos_embeds: per level [N, C, H_l, W_l].
            query_embed: [num_queries, 2C] learned (position, content) of the queries; None in two-stage mode.
            class_heads, bbox_heads: the detection heads, in the order of the module docstring.
            rho: keeping ratio of the sparse encoder; 0 = dense (> 0 needs token_selection).
            refine_boxes: each decoder layer refines the reference boxes with its bbox head.
            enc_aux: run the encoder aux heads (the heads after the decoder's and the proposal head).
        Returns a dict:
            "hs": [n_dec, N, Q, C] decoder states; "references": per decoder layer its reference, [N, Q, 2 or 4].
            "dec_sampling_locations", "dec_attention_weights": per decoder layer, of its cross-attention.
            "padding_mask": [N, S]; "spatial_shapes": [L, 2]; "level_start_index": [L]; "shapes": [(H_l, W_l)].
            two-stage: "enc_outputs_class" [N, S, num_classes], "enc_outputs_coord_unact" [N, S, 4].
            rho > 0: "token_scores" [N, S] scoring-network logits, "topk_inds" [N, K] the selected tokens,
                "num_kept" [N] how many of them each image updates.
            enc_aux: "enc_aux_outputs" per encoder layer but the last, (logits, sigmoid boxes).
        """
        shapes = [(src.shape[2], src.shape[3]) for src in srcs]
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        padding_mask = torch.cat([mask.flatten(1) for mask in masks], 1)
        lvl_pos_embed = torch.cat(
            [pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
             for lvl, pos in enumerate(pos_embeds)],
            1,
        )
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flatten.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)
        out: Dict[str, Any] = {
            "padding_mask": padding_mask,
            "spatial_shapes": spatial_shapes,
            "level_start_index": level_start_index,
            "shapes": shapes,
        }

        sparse = rho > 0
        if sparse and not self.token_selection:
            raise ValueError(f"rho={rho} needs a model built with a scoring network (MODEL.SPARSE_DETR.RHO > 0)")
        proposals = proposal_valid = None
        if self.two_stage or sparse or enc_aux:
            # the anchors depend on the masks only: computed once for the scoring net, aux heads and two-stage
            proposals, proposal_valid = encoder_output_proposals(padding_mask, shapes)

        topk_inds = num_kept = None
        if sparse:
            tokens = self._project_tokens(src_flatten + lvl_pos_embed, padding_mask, proposal_valid)
            out["token_scores"] = self.enc_mask_predictor(tokens)
            topk_inds, num_kept = select_top_rho_tokens(out["token_scores"], padding_mask, rho)
            out["topk_inds"], out["num_kept"] = topk_inds, num_kept

        n_dec = self.decoder.num_layers
        aux_start = n_dec + int(self.two_stage)
        memory, enc_aux_outputs = self.encoder(
            src_flatten,
            lvl_pos_embed,
            shapes,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            padding_mask,
            topk_inds=topk_inds,
            num_kept=num_kept,
            aux_class_heads=class_heads[aux_start:] if enc_aux else None,
            aux_bbox_heads=bbox_heads[aux_start:] if enc_aux else None,
            aux_proposals=proposals,
        )
        if enc_aux:
            out["enc_aux_outputs"] = enc_aux_outputs

        N = memory.shape[0]
        if self.two_stage:
            output_memory = self._project_tokens(memory, padding_mask, proposal_valid)
            enc_class = class_heads[n_dec](output_memory)
            enc_coord_unact = proposals + bbox_heads[n_dec](output_memory)
            out["enc_outputs_class"], out["enc_outputs_coord_unact"] = enc_class, enc_coord_unact

            objectness = enc_class.max(-1).values if self.eff_specific_head else enc_class[..., 0]
            # a tiny image may have fewer tokens than queries
            k = min(self.num_queries, objectness.shape[1])
            topk_proposals = objectness.topk(k, dim=1).indices
            topk_coords_unact = gather_tokens(enc_coord_unact, topk_proposals).detach()
            reference_points = topk_coords_unact.sigmoid()
            # 4 coordinates x d/2 features = 2d (the reference hard-codes 128 features, i.e. d = 256)
            box_embed = sine_embedding(topk_coords_unact.sigmoid() * (2 * math.pi), self.d_model // 2).flatten(2)
            pos_trans_out = self.pos_trans_norm(self.pos_trans(box_embed))
            if self.eff_query_init:
                tgt = gather_tokens(memory, topk_proposals)
                query_pos = pos_trans_out
            else:
                query_pos, tgt = pos_trans_out.split(self.d_model, dim=2)
        else:
            if query_embed is None:
                raise ValueError("query_embed is required without two_stage")
            query_pos, tgt = query_embed.split(self.d_model, dim=1)
            query_pos = query_pos[None].expand(N, -1, -1)
            tgt = tgt[None].expand(N, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()

        hs, references, locations, weights = self.decoder(
            tgt,
            query_pos,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            padding_mask,
            bbox_heads=bbox_heads[:n_dec] if refine_boxes else None,
        )
        out.update(hs=hs, references=references, dec_sampling_locations=locations, dec_attention_weights=weights)
        return out
