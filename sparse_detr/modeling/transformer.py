"""The deformable transformer of Deformable DETR / Efficient DETR / Sparse DETR.

It takes the projected multi-level features and returns what its parts computed (:class:`TransformerOutput`); in
between: flattening with level embeddings, the token selection by the scoring network (Sparse DETR), the (sparse)
encoder, the two-stage proposals from the encoder output with top-k query initialization (Efficient DETR, or DINO's
mixed query selection), and the decoder, which may also take DINO's denoising queries in training. The detection
heads are owned by the meta-architecture and passed in (:class:`DetectionHeads`).
"""

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from torch import Tensor, nn

from ..layers.multi_scale_deform_attn import MSDeformAttn
from ..layers.position_encoding import sine_embedding
from .deformable_decoder import DecoderOutput, DeformableDecoder
from .deformable_encoder import DeformableEncoder, gather_tokens
from .denoising import DenoisingInput
from .heads import DetectionHeads
from .levels import FlatLevels, size_min, valid_sizes
from .structures import Prediction
from .token_selection import ScoringNetwork, TokenSelection, select_top_rho_tokens

__all__ = ["DeformableTransformer", "TransformerOutput", "encoder_output_proposals"]


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
        mask = padding_mask[:, start : start + h * w].view(N, h, w)
        ys = torch.arange(h, dtype=torch.float32, device=padding_mask.device)
        xs = torch.arange(w, dtype=torch.float32, device=padding_mask.device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([grid_x, grid_y], -1)
        scale = valid_sizes(mask).flip(-1).view(N, 1, 1, 2)
        centres = (grid[None].expand(N, -1, -1, -1) + 0.5) / scale
        sizes = torch.full_like(centres, 0.05 * 2.0**lvl)
        proposals.append(torch.cat((centres, sizes), -1).view(N, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(padding_mask[..., None], float("inf")).masked_fill(~valid, float("inf"))
    return proposals, valid


@dataclass
class TransformerOutput:
    """What one forward of :class:`DeformableTransformer` computed.

    Attributes:
        levels: the layout of the encoder tokens.
        decoder: the decoder's states, references and cross-attention.
        proposals: (two-stage) the proposal head on every encoder token: logits [N, S, num_classes] and boxes
            [N, S, 4] (anchor + delta, after the sigmoid); None otherwise.
        selection: (Sparse DETR) the scoring network's scores and the tokens the encoder updated; None for a dense
            encoder.
        encoder_aux: (encoder aux loss) the predictions on the queries of every encoder layer but the last.
        denoising: (training with denoising queries) the decoder's outputs on them; `decoder` then holds those of
            the matching queries only. None without denoising queries.
    """

    levels: FlatLevels
    decoder: DecoderOutput
    proposals: Optional[Prediction] = None
    selection: Optional[TokenSelection] = None
    encoder_aux: List[Prediction] = field(default_factory=list)
    denoising: Optional[DecoderOutput] = None


class DeformableTransformer(nn.Module):
    """The transformer of every variant; the variant is chosen by `two_stage`, `eff_query_init`,
    `mixed_query_selection` and `rho` (see the arguments) and by the heads' layout passed to `forward` (how two-stage
    proposals are scored).

    The encoder, the decoder and the scoring network are built outside and injected (`from_config` builds them from
    MODEL.SPARSE_DETR); the transformer initializes every parameter it holds as the reference does.

    Errors name the argument and the config key it is read from.
    """

    @configurable
    def __init__(
        self,
        *,
        encoder: DeformableEncoder,
        decoder: DeformableDecoder,
        scoring_network: Optional[ScoringNetwork] = None,
        two_stage: bool = False,
        num_queries: int = 300,
        eff_query_init: bool = False,
        mixed_query_selection: bool = False,
        rho: float = 0.0,
        test_rho: float = -1.0,
    ):
        """
        Args:
            encoder: the (dense or sparse) encoder; its d_model and n_levels are the transformer's.
            decoder: the decoder, of the encoder's d_model and n_levels.
            scoring_network: Sparse DETR's scoring network of the tokens, given exactly when rho > 0.
            two_stage: decoder queries come from the top-scoring encoder proposals.
            num_queries: decoder queries; the number of proposals kept in two-stage mode.
            eff_query_init: (two-stage) Efficient DETR: the queries' content is the proposals' encoder features,
                their position embedding the proposals' box embedding.
            mixed_query_selection: (two-stage) DINO's mixed query selection: the queries' position embedding is the
                proposals' box embedding, their content learned (`tgt_embed`, one per query, shared by all images).
                DINO recomputes the position embedding from the refined box in every decoder layer; here it stays
                the one of the proposal box, as for every other variant of this model.
            rho: Sparse DETR's keeping ratio of encoder tokens in training, in [0, 1]; 0 = dense encoder. rho > 0
                needs the scoring network and two_stage (it shares the encoder-output projection).
            test_rho: the keeping ratio at inference, <= 1; <= 0 means rho. Needs rho > 0.
        """
        super().__init__()
        d_model, num_feature_levels = encoder.d_model, encoder.n_levels
        if (decoder.d_model, decoder.n_levels) != (d_model, num_feature_levels):
            raise ValueError(
                f"decoder: its d_model and n_levels {decoder.d_model, decoder.n_levels} must be the encoder's "
                f"{d_model, num_feature_levels} (both MODEL.SPARSE_DETR.HIDDEN_DIM, NUM_FEATURE_LEVELS from a config)"
            )
        if num_queries < 1:
            raise ValueError(f"num_queries (MODEL.SPARSE_DETR.NUM_QUERIES) must be >= 1, got {num_queries}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho (MODEL.SPARSE_DETR.RHO) must be in [0, 1] (0 = dense encoder), got {rho}")
        if test_rho > 1.0:
            raise ValueError(f"test_rho (MODEL.SPARSE_DETR.TEST_RHO) must be <= 1 (<= 0 = use RHO), got {test_rho}")
        if test_rho > 0 and rho == 0:
            raise ValueError(
                f"test_rho (MODEL.SPARSE_DETR.TEST_RHO) = {test_rho} needs a sparse model (rho, "
                "MODEL.SPARSE_DETR.RHO > 0): a dense model has no scoring network"
            )
        if (scoring_network is not None) != (rho > 0):
            raise ValueError(
                f"scoring_network: a sparse encoder (rho, MODEL.SPARSE_DETR.RHO > 0) needs one, a dense one has "
                f"none; got rho = {rho} and {'a' if scoring_network is not None else 'no'} scoring network"
            )
        if eff_query_init and mixed_query_selection:
            raise ValueError(
                "eff_query_init (MODEL.SPARSE_DETR.EFF_QUERY_INIT) and mixed_query_selection "
                "(MODEL.SPARSE_DETR.MIXED_QUERY_SELECTION) both set the queries' content: choose one"
            )
        for name, key, on in (
            ("eff_query_init", "EFF_QUERY_INIT", eff_query_init),
            ("mixed_query_selection", "MIXED_QUERY_SELECTION", mixed_query_selection),
            ("rho > 0", "RHO > 0", rho > 0),
        ):
            if on and not two_stage:
                raise ValueError(
                    f"{name} (MODEL.SPARSE_DETR.{key}) needs two_stage (MODEL.SPARSE_DETR.TWO_STAGE): it works on "
                    "the encoder-output proposals"
                )
        self.d_model = d_model
        self.num_feature_levels = num_feature_levels
        self.two_stage = two_stage
        self.num_queries = num_queries
        self.eff_query_init = eff_query_init
        self.mixed_query_selection = mixed_query_selection
        self.rho = rho
        self.test_rho = test_rho

        # registered in the reference's order, which the initialization below follows
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.enc_mask_predictor = scoring_network
        self.encoder = encoder
        self.decoder = decoder
        if two_stage:
            # encoder tokens -> proposal features (shared with the scoring network's input)
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            # box embedding of the proposals -> query position (and content, unless the content comes from elsewhere)
            query_dim = d_model if eff_query_init or mixed_query_selection else 2 * d_model
            self.pos_trans = nn.Linear(2 * d_model, query_dim)
            self.pos_trans_norm = nn.LayerNorm(query_dim)
            if mixed_query_selection:
                self.tgt_embed = nn.Embedding(num_queries, d_model)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    @classmethod
    def from_config(cls, cfg):
        S = cfg.MODEL.SPARSE_DETR
        # built in the reference's order: the random initial weights draw in that order
        scoring_network = ScoringNetwork(cfg) if S.RHO > 0 else None
        return {
            "scoring_network": scoring_network,
            "encoder": DeformableEncoder(cfg),
            "decoder": DeformableDecoder(cfg),
            "two_stage": S.TWO_STAGE,
            "num_queries": S.NUM_QUERIES,
            "eff_query_init": S.EFF_QUERY_INIT,
            "mixed_query_selection": S.MIXED_QUERY_SELECTION,
            "rho": S.RHO,
            "test_rho": S.TEST_RHO,
        }

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
        if self.mixed_query_selection:
            nn.init.normal_(self.tgt_embed.weight)  # DINO's initialization of its learned content queries

    @property
    def has_scoring_network(self) -> bool:
        """Sparse DETR (rho > 0): the encoder updates only the tokens the scoring network selects."""
        return self.enc_mask_predictor is not None

    @property
    def inference_rho(self) -> float:
        return self.test_rho if self.test_rho > 0 else self.rho

    def _project_tokens(self, tokens: Tensor, padding_mask: Tensor, proposal_valid: Tensor) -> Tensor:
        """enc_output + LayerNorm of the tokens, padded tokens and tokens without a valid anchor zeroed first."""
        tokens = tokens.masked_fill(padding_mask[..., None] | ~proposal_valid, 0.0)
        return self.enc_output_norm(self.enc_output(tokens))

    def _box_embedding(self, boxes: Tensor) -> Tensor:
        """[N, Q, 4] normalized boxes -> [N, Q, query_dim] pos_trans of their sine embedding (position, then the
        content where pos_trans makes it)."""
        # 4 coordinates x d/2 features = 2d (the reference hard-codes 128 features, i.e. d = 256)
        box_embed = sine_embedding(boxes * (2 * math.pi), self.d_model // 2).flatten(2)
        return self.pos_trans_norm(self.pos_trans(box_embed))

    def forward(
        self,
        srcs: List[Tensor],
        masks: List[Tensor],
        pos_embeds: List[Tensor],
        query_embed: Optional[Tensor],
        heads: DetectionHeads,
        refine_boxes: bool = False,
        enc_aux: bool = False,
        fast: bool = False,
        denoising: Optional[DenoisingInput] = None,
    ) -> TransformerOutput:
        """
        Args:
            srcs: per level [N, C, H_l, W_l] projected features.
            masks: per level [N, H_l, W_l] bool, True on padding.
            pos_embeds: per level [N, C, H_l, W_l].
            query_embed: [num_queries, 2C] learned (position, content) of the queries; None in two-stage mode.
            heads: the detection heads (their proposal head in two-stage mode, scoring proposals as its layout
                says; their decoder heads to refine boxes; their encoder aux heads with enc_aux).
            refine_boxes: each decoder layer refines the reference boxes with its box head.
            enc_aux: run the encoder aux heads.
            fast: (inference) the same outputs with less work: the decoder samples before projecting (see
                :class:`MSDeformAttn`), and two-stage proposals get boxes only where they become queries (the
                output's `proposals`, which only training reads, is then None).
            denoising: (two-stage, training) DINO's denoising queries, decoded in front of the matching queries,
                which never see them (the mask); their position embedding is their boxes', as the matching
                queries'. Their outputs are the output's `denoising`.
        The encoder keeps the share `rho` of the tokens in training mode, `inference_rho` in eval mode.
        """
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        lvl_pos_embed = torch.cat(
            [
                pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                for lvl, pos in enumerate(pos_embeds)
            ],
            1,
        )
        levels = FlatLevels.from_masks(masks)
        padding_mask = levels.padding_mask

        rho = self.rho if self.training else self.inference_rho
        proposals = proposal_valid = None
        if self.two_stage or enc_aux:
            # the anchors depend on the masks only: computed once for the scoring network, aux heads and two-stage
            proposals, proposal_valid = encoder_output_proposals(padding_mask, levels.shapes)

        selection = None
        if rho > 0:
            tokens = self._project_tokens(src_flatten + lvl_pos_embed, padding_mask, proposal_valid)
            selection = select_top_rho_tokens(self.enc_mask_predictor(tokens), padding_mask, rho)

        memory, encoder_aux = self.encoder(
            src_flatten,
            lvl_pos_embed,
            levels,
            selection,
            aux_heads=heads.encoder_aux if enc_aux else (),
            aux_proposals=proposals,
        )

        N = memory.shape[0]
        proposal_predictions = None
        if self.two_stage:
            output_memory = self._project_tokens(memory, padding_mask, proposal_valid)
            proposal_head = heads.proposal
            enc_class = proposal_head.cls(output_memory)
            objectness = enc_class[..., 0] if heads.layout.binary_proposals else enc_class.max(-1).values
            # a tiny image may have fewer tokens than queries
            k = size_min(self.num_queries, objectness.shape[1])
            topk_proposals = objectness.topk(k, dim=1).indices
            if fast:
                # the box head on the k queries' tokens only, not on all S
                topk_coords_unact = gather_tokens(proposals, topk_proposals) + proposal_head.box(
                    gather_tokens(output_memory, topk_proposals)
                )
            else:
                enc_coord_unact = proposals + proposal_head.box(output_memory)
                proposal_predictions = Prediction(enc_class, enc_coord_unact.sigmoid())
                topk_coords_unact = gather_tokens(enc_coord_unact, topk_proposals).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self._box_embedding(reference_points)
            if self.eff_query_init:
                tgt = gather_tokens(memory, topk_proposals)
                query_pos = pos_trans_out
            elif self.mixed_query_selection:
                tgt = self.tgt_embed.weight[:k][None].expand(N, -1, -1)
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

        num_denoising = 0 if denoising is None else denoising.content.shape[1]
        self_attn_mask = None
        if num_denoising:
            if not self.two_stage:
                raise ValueError(
                    "denoising queries need two_stage (MODEL.SPARSE_DETR.TWO_STAGE): their references are boxes"
                )
            # the position part of the box embedding, as the matching queries'
            tgt = torch.cat([denoising.content, tgt], 1)
            query_pos = torch.cat([self._box_embedding(denoising.references)[..., : self.d_model], query_pos], 1)
            reference_points = torch.cat([denoising.references, reference_points], 1)
            num_all = tgt.shape[1]
            if denoising.self_attn_mask.shape[0] < num_all:
                raise ValueError(
                    f"denoising.self_attn_mask is {tuple(denoising.self_attn_mask.shape)} for {num_all} queries "
                    f"({num_denoising} denoising, {num_all - num_denoising} matching): build it for num_queries "
                    f"({self.num_queries}) matching queries"
                )
            self_attn_mask = denoising.self_attn_mask[:num_all, :num_all]

        decoder = self.decoder(
            tgt,
            query_pos,
            reference_points,
            memory,
            levels,
            bbox_heads=[head.box for head in heads.decoder] if refine_boxes else None,
            sample_then_project=fast,
            self_attn_mask=self_attn_mask,
        )
        denoising_out = None
        if num_denoising:
            denoising_out, decoder = decoder.split(num_denoising)
        return TransformerOutput(levels, decoder, proposal_predictions, selection, encoder_aux, denoising_out)
