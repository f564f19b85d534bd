"""All losses of the model in one place: set-prediction losses (focal, L1, GIoU) on the decoder output, every
decoder layer, the two-stage encoder proposals, the encoder aux heads and DINO's denoising queries; and the scoring
network's loss (the paper's DAM target, or Focus-DETR's foreground / Salience-DETR's salience target)."""

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from fvcore.nn import sigmoid_focal_loss
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from .dam import attention_map_to_flat_grid, dam_correlation, dam_target
from .deformable_decoder import DecoderOutput
from .heads import HeadLayout
from .levels import FlatLevels
from .matcher import HungarianMatcher
from .score_targets import (
    foreground_score_loss,
    foreground_target,
    level_ranges_from_bounds,
    salience_score_loss,
    salience_target,
)
from .structures import Prediction, Target
from .token_selection import TokenSelection

__all__ = ["SCORE_TARGETS", "DenoisingPredictions", "LossInputs", "SetCriterion", "build_weight_dict"]

Indices = List[Tuple[Tensor, Tensor]]
# loss key suffix of the two-stage proposals
_PROPOSAL_SUFFIX = "_enc"
# loss key suffix of the denoising queries (then _{i} for decoder layer i but the last)
_DENOISING_SUFFIX = "_dn"
_DENOISING_KEY = re.compile(r"_dn(_\d+)?$")
# the scoring network's targets (MODEL.SPARSE_DETR.SCORE_TARGET)
SCORE_TARGETS = ("dam", "foreground", "salience")


@dataclass
class DenoisingPredictions:
    """The decoder's predictions on DINO's denoising queries, and their fixed assignment to the targets.

    Attributes:
        final: the last decoder layer's, [N, Q_dn, ...]; None when the batch has no denoising query (no target).
        aux: the earlier layers' (aux loss), first to last.
        indices: per image (denoising query indices, target indices) of the positives
            (:func:`~sparse_detr.modeling.denoising.denoising_match_indices`).
        num_groups: G; the losses are normalized by G times the number of boxes, as DINO's.
    """

    final: Optional[Prediction]
    aux: List[Prediction] = field(default_factory=list)
    indices: Indices = field(default_factory=list)
    num_groups: int = 0


@dataclass
class LossInputs:
    """Everything the losses read from one training forward.

    Attributes:
        final: the last decoder layer's predictions.
        decoder_aux: the earlier decoder layers' (aux loss), first to last; empty without it.
        proposals: (two-stage) the proposal head on every encoder token.
        encoder_aux: (encoder aux loss) per encoder layer but the last, on its queries.
        selection: (Sparse DETR) the scoring network's scores and selected tokens; with it, `levels` is needed
            too, and `decoder` (whose cross-attention gives the DAM) for the DAM target, `image_sizes` for the
            others.
        image_sizes: (height, width) of every image before padding, in the network input's pixels (ImageList's).
        denoising: (DN training) the predictions on the denoising queries.
    """

    final: Prediction
    decoder_aux: List[Prediction] = field(default_factory=list)
    proposals: Optional[Prediction] = None
    encoder_aux: List[Prediction] = field(default_factory=list)
    selection: Optional[TokenSelection] = None
    levels: Optional[FlatLevels] = None
    decoder: Optional[DecoderOutput] = None
    image_sizes: Optional[Union[Tensor, Sequence[Tuple[int, int]]]] = None
    denoising: Optional[DenoisingPredictions] = None


def build_weight_dict(
    cls_loss_coef: float,
    bbox_loss_coef: float,
    giou_loss_coef: float,
    mask_prediction_coef: float,
    num_decoder_layers: int,
    aux_loss: bool,
    two_stage: bool,
    num_encoder_aux_layers: int,
    scoring_network: bool,
    denoising: bool = False,
) -> Dict[str, float]:
    """Weight of every loss the criterion returns, keyed like the reference: `loss_ce`, `loss_bbox`, `loss_giou`,
    suffixed `_{i}` for decoder layer i (all but the last), `_enc` for the two-stage proposals, `_enc_{i}` for
    encoder aux layer i, `_dn` and `_dn_{i}` for the denoising queries of the last and of decoder layer i (DINO's
    weights: the matching queries'); and `loss_mask_prediction` (the scoring network's, whatever its target)."""
    base = {"loss_ce": cls_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    decoder_layers = [""]
    if aux_loss:
        decoder_layers += [f"_{i}" for i in range(num_decoder_layers - 1)]
    suffixes = list(decoder_layers)
    if two_stage:
        suffixes.append(_PROPOSAL_SUFFIX)
    suffixes += [f"_enc_{i}" for i in range(num_encoder_aux_layers)]
    if denoising:
        suffixes += [_DENOISING_SUFFIX + s for s in decoder_layers]
    weights = {k + s: v for s in suffixes for k, v in base.items()}
    if scoring_network:
        weights["loss_mask_prediction"] = mask_prediction_coef
    return weights


def _permutation_idx(indices: Indices) -> Tuple[Tensor, Tensor]:
    """(batch index, prediction index) of every matched prediction."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


class SetCriterion(nn.Module):
    """
    Args:
        num_classes: number of classes (no "no-object" class: sigmoid scores).
        matcher: the Hungarian matcher.
        weight_dict: weight of each loss key (see :func:`build_weight_dict`); every returned loss must have one.
        focal_alpha: alpha of the sigmoid focal loss.
        binary_enc_targets: the two-stage proposals are trained as objectness (every target is class 0) instead
            of with their classes (:attr:`HeadLayout.binary_proposals`).
        score_target: the scoring network's target, one of :data:`SCORE_TARGETS`: "dam" (the paper's), "foreground"
            (Focus-DETR's), "salience" (Salience-DETR's); see :mod:`.score_targets`.
        score_level_ranges: ("foreground", "salience") per level the (lower, upper] range of a token's largest
            distance to the edges of its box, in input pixels.
    """

    @configurable
    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Dict[str, float],
        focal_alpha: float = 0.25,
        binary_enc_targets: bool = True,
        score_target: str = "dam",
        score_level_ranges: Sequence[Tuple[float, float]] = (),
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes (MODEL.SPARSE_DETR.NUM_CLASSES) must be >= 1, got {num_classes}")
        if score_target not in SCORE_TARGETS:
            raise ValueError(
                f"score_target (MODEL.SPARSE_DETR.SCORE_TARGET) must be one of {SCORE_TARGETS}, got {score_target!r}"
            )
        if score_target != "dam" and not score_level_ranges:
            raise ValueError(
                f"score_target {score_target!r} needs score_level_ranges (MODEL.SPARSE_DETR.SCORE_LEVEL_BOUNDS)"
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha
        self.binary_enc_targets = binary_enc_targets
        self.score_target = score_target
        self.score_level_ranges = tuple(score_level_ranges)

    @classmethod
    def from_config(cls, cfg):
        S = cfg.MODEL.SPARSE_DETR
        layout = HeadLayout.from_config(cfg)
        weight_dict = build_weight_dict(
            cls_loss_coef=S.CLS_LOSS_COEF,
            bbox_loss_coef=S.BBOX_LOSS_COEF,
            giou_loss_coef=S.GIOU_LOSS_COEF,
            mask_prediction_coef=S.MASK_PREDICTION_COEF,
            num_decoder_layers=layout.num_decoder_layers,
            aux_loss=S.AUX_LOSS,
            two_stage=layout.two_stage,
            num_encoder_aux_layers=layout.num_encoder_aux,
            scoring_network=S.RHO > 0,
            denoising=S.DN.ENABLED,
        )
        return {
            "num_classes": S.NUM_CLASSES,
            "matcher": HungarianMatcher(cfg),
            "weight_dict": weight_dict,
            "focal_alpha": S.FOCAL_ALPHA,
            "binary_enc_targets": layout.binary_proposals,
            "score_target": S.SCORE_TARGET,
            # read only by the targets that use them: a config of another level count keeps the DAM target as it is
            "score_level_ranges": (
                () if S.SCORE_TARGET == "dam" else level_ranges_from_bounds(S.SCORE_LEVEL_BOUNDS, S.NUM_FEATURE_LEVELS)
            ),
        }

    def loss_labels(self, logits: Tensor, targets: List[Target], indices: Indices, num_boxes: float) -> Tensor:
        """Sigmoid focal loss over all queries and classes, unmatched queries all-negative; summed over classes,
        averaged over queries, times the number of queries, over num_boxes (the reference's normalization)."""
        idx = _permutation_idx(indices)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[idx] = torch.cat([t.labels[j] for t, (_, j) in zip(targets, indices)])
        onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
        loss = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=2.0, reduction="none")
        return loss.mean(1).sum() / num_boxes * logits.shape[1]

    def loss_boxes(
        self, boxes: Tensor, targets: List[Target], indices: Indices, num_boxes: float
    ) -> Tuple[Tensor, Tensor]:
        """L1 and 1 - GIoU of the matched boxes, each summed over num_boxes."""
        src = boxes[_permutation_idx(indices)]
        tgt = torch.cat([t.boxes[j] for t, (_, j) in zip(targets, indices)], dim=0).to(src.dtype)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))
        loss_giou = (1 - torch.diag(giou)).sum() / num_boxes
        return loss_bbox, loss_giou

    def _set_losses(
        self, pred: Prediction, targets: List[Target], num_boxes: float, suffix: str
    ) -> Tuple[Dict[str, Tensor], Indices]:
        indices = self.matcher(pred.logits, pred.boxes, targets)
        loss_ce = self.loss_labels(pred.logits, targets, indices, num_boxes)
        loss_bbox, loss_giou = self.loss_boxes(pred.boxes, targets, indices, num_boxes)
        losses = {f"loss_ce{suffix}": loss_ce, f"loss_bbox{suffix}": loss_bbox, f"loss_giou{suffix}": loss_giou}
        return losses, indices

    @torch.no_grad()
    def _detection_metrics(self, logits: Tensor, targets: List[Target], indices: Indices) -> Dict[str, Tensor]:
        """The reference's log-only figures for the last decoder layer."""
        idx = _permutation_idx(indices)
        labels = torch.cat([t.labels[j] for t, (_, j) in zip(targets, indices)])
        if labels.numel() == 0:
            accuracy = logits.new_zeros(())
        else:
            accuracy = (logits[idx].argmax(-1) == labels).float().mean() * 100
        # as the reference (a leftover of DETR's softmax with a no-object last class): queries whose best class
        # is not the last one, against the number of targets
        card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        card_tgt = torch.as_tensor([len(t.labels) for t in targets], device=logits.device, dtype=torch.float)
        return {"class_error": 100 - accuracy, "cardinality_error": F.l1_loss(card_pred, card_tgt)}

    def loss_mask_prediction(
        self, selection: TokenSelection, levels: FlatLevels, decoder: DecoderOutput
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Multi-label soft-margin loss of the scoring network's scores against the top-rho DAM tokens, and the DAM
        correlation of the tokens the scoring network selected (all K of them, as the reference)."""
        scores, padding_mask = selection.scores, levels.padding_mask
        dam = attention_map_to_flat_grid(
            torch.stack(decoder.sampling_locations, 1),
            torch.stack(decoder.attention_weights, 1),
            levels.spatial_shapes,
            levels.level_start_index,
            scores.shape[1],
        )
        target = dam_target(dam, padding_mask, selection.num_kept, selection.indices.shape[1])
        # padded tokens get the batch minimum as in the reference, so they cost what its loss charges
        loss = F.multilabel_soft_margin_loss(scores.masked_fill(padding_mask, scores.min()), target.to(scores.dtype))

        selected = torch.zeros_like(dam).scatter_(1, selection.indices, 1.0)
        corr = dam_correlation(selected, dam, levels.shapes)
        metrics = {"corr_mask_attn_map_dec_all": corr[0]}
        metrics.update({f"corr_mask_attn_map_dec_{lvl}": c for lvl, c in enumerate(corr[1:])})
        return loss, metrics

    def loss_box_score_target(
        self,
        selection: TokenSelection,
        levels: FlatLevels,
        targets: List[Target],
        image_sizes: Union[Tensor, Sequence[Tuple[int, int]]],
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The scoring network's loss against a target made from the boxes alone (Focus-DETR's foreground or
        Salience-DETR's salience, padded tokens left out), and the share of the target's mass on the selected
        tokens (`kept_score_target`, a log-only figure like the DAM correlation)."""
        make, loss_fn = {
            "foreground": (foreground_target, foreground_score_loss),
            "salience": (salience_target, salience_score_loss),
        }[self.score_target]
        target = make(targets, levels, image_sizes, self.score_level_ranges)
        loss = loss_fn(selection.scores, target, ~levels.padding_mask)
        with torch.no_grad():
            kept = (target * selection.keep_mask()).sum() / target.sum().clamp(min=1e-6)
        return loss, {"kept_score_target": kept}

    def loss_token_scores(self, outputs: LossInputs, targets: List[Target]) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The scoring network's loss against `score_target` (its target built here: the DAM's from the decoder's
        cross-attention, the others' from the boxes), and its log-only figures."""
        if self.score_target == "dam":
            if outputs.levels is None or outputs.decoder is None:
                raise ValueError("LossInputs: the DAM target of the scoring network needs levels and decoder")
            return self.loss_mask_prediction(outputs.selection, outputs.levels, outputs.decoder)
        if outputs.levels is None or outputs.image_sizes is None:
            raise ValueError(
                f"LossInputs: the {self.score_target} target of the scoring network needs levels and image_sizes"
            )
        return self.loss_box_score_target(outputs.selection, outputs.levels, targets, outputs.image_sizes)

    def denoising_losses(
        self, denoising: DenoisingPredictions, targets: List[Target], num_boxes: float, device: torch.device
    ) -> Dict[str, Tensor]:
        """DINO's losses of the denoising queries, for each decoder layer predicted: the set losses with the fixed
        assignment of the positives (negatives and padding are "no object"), over G * num_boxes. Zero without a
        denoising query (a batch without targets)."""
        if denoising.final is None:
            zero = torch.zeros((), device=device)
            return {k: zero for k in self.weight_dict if _DENOISING_KEY.search(k)}
        layers = [_DENOISING_SUFFIX + f"_{i}" for i in range(len(denoising.aux))] + [_DENOISING_SUFFIX]
        losses = {}
        normalizer = num_boxes * denoising.num_groups
        for suffix, pred in zip(layers, denoising.aux + [denoising.final]):
            losses[f"loss_ce{suffix}"] = self.loss_labels(pred.logits, targets, denoising.indices, normalizer)
            losses[f"loss_bbox{suffix}"], losses[f"loss_giou{suffix}"] = self.loss_boxes(
                pred.boxes, targets, denoising.indices, normalizer
            )
        return losses

    @staticmethod
    def _prediction_sets(outputs: LossInputs) -> List[Tuple[str, Prediction]]:
        """(loss key suffix, predictions) of every set the set losses match, as `build_weight_dict` names them."""
        sets = [("", outputs.final)] + [(f"_{i}", p) for i, p in enumerate(outputs.decoder_aux)]
        if outputs.proposals is not None:
            sets.append((_PROPOSAL_SUFFIX, outputs.proposals))
        return sets + [(f"_enc_{i}", p) for i, p in enumerate(outputs.encoder_aux)]

    def _num_boxes_and_non_finite(
        self, sets: List[Tuple[str, Prediction]], outputs: LossInputs, targets: List[Target]
    ) -> Tuple[float, List[str]]:
        """Average number of target boxes per worker (at least 1), and the names of the predictions that hold a
        NaN or an infinity; one host sync for both (the count needs one anyway)."""
        named = {}
        for suffix, pred in sets:
            named[f"logits (loss_ce{suffix})"] = pred.logits
            named[f"boxes (loss_bbox{suffix})"] = pred.boxes
        if outputs.selection is not None:
            named["token scores (loss_mask_prediction)"] = outputs.selection.scores
        if outputs.denoising is not None and outputs.denoising.final is not None:
            dn = outputs.denoising
            layers = [f"{_DENOISING_SUFFIX}_{i}" for i in range(len(dn.aux))] + [_DENOISING_SUFFIX]
            for suffix, pred in zip(layers, dn.aux + [dn.final]):
                named[f"logits (loss_ce{suffix})"] = pred.logits
                named[f"boxes (loss_bbox{suffix})"] = pred.boxes
        device = outputs.final.logits.device
        num = torch.as_tensor([float(sum(len(t.labels) for t in targets))], device=device)
        world_size = comm.get_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(num)
        finite = torch.stack([torch.isfinite(t).all() for t in named.values()]).to(num.dtype)
        values = torch.cat([torch.clamp(num / world_size, min=1), finite]).tolist()
        return values[0], [name for name, ok in zip(named, values[1:]) if not ok]

    def forward(self, outputs: LossInputs, targets: List[Target]) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """
        Args:
            outputs: the predictions (and, for Sparse DETR, the scoring network's inputs to its loss).
            targets: per image.
        Returns:
            losses: unweighted, keyed as in `weight_dict`.
            metrics: log-only scalars (class_error, cardinality_error, and with a scoring network
                corr_mask_attn_map_dec_* for the DAM target, kept_score_target for the others).
        Raises:
            FloatingPointError: a prediction holds NaN or infinity (named, with the trainer's iteration).
        """
        sets = self._prediction_sets(outputs)
        num_boxes, non_finite = self._num_boxes_and_non_finite(sets, outputs, targets)
        if non_finite:
            # scipy's assignment would fail on the costs with a message that names neither
            try:
                when = f"at iteration {get_event_storage().iter}"
            except AssertionError:  # not inside a trainer
                when = "outside a trainer"
            raise FloatingPointError(
                f"Non-finite predictions {when}: {', '.join(non_finite)} hold NaN or infinity. Training diverged "
                "(e.g. SOLVER.BASE_LR too high) or the input is not finite (e.g. MODEL.PIXEL_STD with a zero)."
            )
        losses, indices = self._set_losses(outputs.final, targets, num_boxes, "")
        metrics = self._detection_metrics(outputs.final.logits, targets, indices)

        enc_targets = targets
        if outputs.proposals is not None and self.binary_enc_targets:
            enc_targets = [t._replace(labels=torch.zeros_like(t.labels)) for t in targets]
        for suffix, pred in sets[1:]:
            set_targets = enc_targets if suffix == _PROPOSAL_SUFFIX else targets
            losses.update(self._set_losses(pred, set_targets, num_boxes, suffix)[0])
        if outputs.selection is not None:
            losses["loss_mask_prediction"], score_metrics = self.loss_token_scores(outputs, targets)
            metrics.update(score_metrics)
        if outputs.denoising is not None:
            losses.update(self.denoising_losses(outputs.denoising, targets, num_boxes, outputs.final.logits.device))

        missing = sorted(set(losses) - set(self.weight_dict))
        if missing:
            raise KeyError(f"SetCriterion: no weight for {missing}; weight_dict has {sorted(self.weight_dict)}")
        return losses, metrics
