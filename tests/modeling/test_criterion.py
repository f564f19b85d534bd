import math

import pytest
import torch
import torch.nn.functional as F

from sparse_detr.modeling.criterion import LossInputs, SetCriterion, build_weight_dict
from sparse_detr.modeling.matcher import HungarianMatcher
from sparse_detr.modeling.structures import Prediction, Target


def test_weight_dict_keys_follow_the_reference():
    w = build_weight_dict(
        2, 5, 2, 1, num_decoder_layers=3, aux_loss=True, two_stage=True, num_encoder_aux_layers=2, scoring_network=True
    )
    assert w["loss_ce"] == 2 and w["loss_bbox_1"] == 5 and w["loss_giou_enc"] == 2 and w["loss_ce_enc_1"] == 2
    assert w["loss_mask_prediction"] == 1
    assert len(w) == 3 * (1 + 2 + 1 + 2) + 1
    plain = build_weight_dict(
        2, 5, 2, 1, 3, aux_loss=False, two_stage=False, num_encoder_aux_layers=0, scoring_network=False
    )
    assert sorted(plain) == ["loss_bbox", "loss_ce", "loss_giou"]


def _criterion(binary_enc_targets=True):
    weights = build_weight_dict(2, 5, 2, 1, 2, True, True, 0, False)
    return SetCriterion(3, HungarianMatcher(), weights, focal_alpha=0.25, binary_enc_targets=binary_enc_targets)


def test_losses_of_a_hand_checked_prediction():
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.2, 0.4]]])
    logits = torch.tensor([[[3.0, -2.0, -1.0], [0.0, 0.5, -3.0]]])
    target_box = torch.tensor([[0.3, 0.3, 0.2, 0.2]])
    targets = [Target(torch.tensor([0]), target_box)]
    losses, metrics = _criterion()(LossInputs(Prediction(logits, boxes)), targets)
    assert losses["loss_bbox"].item() == 0 and abs(losses["loss_giou"].item()) < 1e-6
    # focal loss of every (query, class), one positive (query 0, class 0), / num_boxes=1, as the reference
    onehot = torch.zeros(1, 2, 3)
    onehot[0, 0, 0] = 1
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    alpha_t = 0.25 * onehot + 0.75 * (1 - onehot)
    expected = (alpha_t * ce * (1 - p_t) ** 2).mean(1).sum() * 2
    assert torch.allclose(losses["loss_ce"], expected)
    assert metrics["class_error"].item() == 0


def test_aux_enc_outputs_and_empty_images():
    torch.manual_seed(0)
    pred = Prediction(torch.randn(2, 4, 3), torch.rand(2, 4, 4) * 0.5 + 0.1)
    outputs = LossInputs(pred, decoder_aux=[pred], proposals=pred)
    targets = [
        Target(torch.tensor([2, 1]), torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.2, 0.3, 0.1, 0.1]])),
        Target(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4)),
    ]
    losses, _ = _criterion()(outputs, targets)
    assert sorted(losses) == sorted(build_weight_dict(2, 5, 2, 1, 2, True, True, 0, False))
    assert all(torch.isfinite(v) for v in losses.values())
    assert torch.allclose(losses["loss_ce_0"], losses["loss_ce"])
    # binary proposal targets: everything is class 0, so the proposal loss differs from the class-specific one
    assert not torch.allclose(losses["loss_ce_enc"], losses["loss_ce"])
    specific, _ = _criterion(binary_enc_targets=False)(outputs, targets)
    assert torch.allclose(specific["loss_ce_enc"], losses["loss_ce"])

    no_boxes = [Target(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))] * 2
    empty, metrics = _criterion()(outputs, no_boxes)
    assert empty["loss_bbox"].item() == 0 and empty["loss_giou"].item() == 0 and empty["loss_ce"].item() > 0
    assert math.isfinite(metrics["class_error"].item())


def test_scoring_network_loss_needs_the_decoder_attention():
    from sparse_detr.modeling.token_selection import TokenSelection

    pred = Prediction(torch.randn(1, 4, 3), torch.rand(1, 4, 4) * 0.5 + 0.1)
    selection = TokenSelection(torch.randn(1, 6), torch.tensor([[2, 0]]), torch.tensor([2]))
    weights = build_weight_dict(2, 5, 2, 1, 1, False, False, 0, scoring_network=True)
    criterion = SetCriterion(3, HungarianMatcher(), weights)
    with pytest.raises(ValueError, match="needs levels and decoder"):
        criterion(LossInputs(pred, selection=selection), [Target(torch.tensor([1]), torch.rand(1, 4))])


def _sparse_case():
    """Two images, 2 levels (4 x 4 and 2 x 2), image 1 padded to the left half; boxes in pixels of 64 x 64."""
    from sparse_detr.modeling.levels import FlatLevels
    from sparse_detr.modeling.token_selection import select_top_rho_tokens

    masks = [torch.zeros(2, 4, 4, dtype=torch.bool), torch.zeros(2, 2, 2, dtype=torch.bool)]
    masks[0][1, :, 2:] = True
    masks[1][1, :, 1:] = True
    levels = FlatLevels.from_masks(masks)
    scores = torch.randn(2, levels.num_tokens, generator=torch.Generator().manual_seed(0), requires_grad=True)
    selection = select_top_rho_tokens(scores, levels.padding_mask, 0.3)
    targets = [
        Target(torch.tensor([0, 1]), torch.tensor([[0.25, 0.25, 0.4, 0.4], [0.6, 0.6, 0.8, 0.8]])),
        Target(torch.tensor([2]), torch.tensor([[0.5, 0.5, 0.5, 0.5]])),
    ]
    return levels, selection, targets, [(64, 64), (64, 32)]


@pytest.mark.parametrize("score_target", ["foreground", "salience"])
def test_box_score_targets_replace_the_dam(score_target, monkeypatch):
    """Focus-DETR's and Salience-DETR's targets come from the boxes: the decoder's attention map is never built."""
    import sparse_detr.modeling.criterion as criterion_module
    from sparse_detr.modeling import score_targets

    def no_dam(*args, **kwargs):
        raise AssertionError("the DAM was built")

    monkeypatch.setattr(criterion_module, "attention_map_to_flat_grid", no_dam)
    levels, selection, targets, sizes = _sparse_case()
    ranges = ((-1.0, 16.0), (16.0, float("inf")))
    weights = build_weight_dict(2, 5, 2, 1.5, 1, False, False, 0, scoring_network=True)
    criterion = SetCriterion(3, HungarianMatcher(), weights, score_target=score_target, score_level_ranges=ranges)
    pred = Prediction(torch.randn(2, 4, 3), torch.rand(2, 4, 4) * 0.5 + 0.1)
    losses, metrics = criterion(LossInputs(pred, selection=selection, levels=levels, image_sizes=sizes), targets)

    make = getattr(score_targets, f"{score_target}_target")
    loss_fn = getattr(score_targets, f"{score_target}_score_loss")
    target = make(targets, levels, sizes, ranges)
    assert target.sum() > 0
    expected = loss_fn(selection.scores, target, ~levels.padding_mask)
    assert torch.equal(losses["loss_mask_prediction"], expected)
    kept = (target * selection.keep_mask()).sum() / target.sum()
    assert metrics["kept_score_target"] == pytest.approx(kept.item())
    assert not any(k.startswith("corr_mask_attn_map") for k in metrics)
    with pytest.raises(ValueError, match="needs levels and image_sizes"):
        criterion(LossInputs(pred, selection=selection, levels=levels), targets)


def test_bad_score_targets_name_the_key():
    weights = build_weight_dict(2, 5, 2, 1, 1, False, False, 0, scoring_network=True)
    with pytest.raises(ValueError, match="MODEL.SPARSE_DETR.SCORE_TARGET"):
        SetCriterion(3, HungarianMatcher(), weights, score_target="focus")
    with pytest.raises(ValueError, match="MODEL.SPARSE_DETR.SCORE_LEVEL_BOUNDS"):
        SetCriterion(3, HungarianMatcher(), weights, score_target="foreground")


def test_denoising_losses_use_the_fixed_assignment_over_groups_times_boxes():
    """DINO's denoising losses: the set losses of the positives against their own targets, negatives and padding
    as "no object", over G * num_boxes, for every decoder layer; zero (with every key) without a denoising query."""
    from sparse_detr.modeling.criterion import DenoisingPredictions
    from sparse_detr.modeling.denoising import build_denoising_queries, denoising_match_indices

    targets = [
        Target(torch.tensor([2, 1]), torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.2, 0.3, 0.1, 0.1]])),
        Target(torch.tensor([0]), torch.tensor([[0.6, 0.4, 0.3, 0.3]])),
    ]
    dq = build_denoising_queries(targets, 3, 4, 0.5, 1.0, 4, torch.Generator().manual_seed(0))
    assert dq.num_groups == 2
    g = torch.Generator().manual_seed(1)
    layers = [Prediction(torch.randn(2, dq.num_queries, 3, generator=g), dq.boxes * 0.9 + 0.05) for _ in range(2)]
    weights = build_weight_dict(2, 5, 2, 1, 2, True, False, 0, scoring_network=False, denoising=True)
    assert {"loss_ce_dn", "loss_bbox_dn_0", "loss_giou_dn"} <= set(weights) and weights["loss_bbox_dn"] == 5
    criterion = SetCriterion(3, HungarianMatcher(), weights)
    matching = Prediction(torch.randn(2, 4, 3), torch.rand(2, 4, 4) * 0.5 + 0.1)
    indices = denoising_match_indices(dq)
    dn = DenoisingPredictions(layers[1], [layers[0]], indices, dq.num_groups)
    losses, _ = criterion(LossInputs(matching, decoder_aux=[matching], denoising=dn), targets)
    assert sorted(losses) == sorted(weights)
    for suffix, pred in (("_dn_0", layers[0]), ("_dn", layers[1])):
        num = 3.0 * 2  # 3 boxes, 2 groups
        assert torch.equal(losses[f"loss_ce{suffix}"], criterion.loss_labels(pred.logits, targets, indices, num))
        bbox, giou = criterion.loss_boxes(pred.boxes, targets, indices, num)
        assert torch.equal(losses[f"loss_bbox{suffix}"], bbox) and torch.equal(losses[f"loss_giou{suffix}"], giou)

    none = DenoisingPredictions(final=None)
    empty = [Target(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))] * 2
    losses, _ = criterion(LossInputs(matching, decoder_aux=[matching], denoising=none), empty)
    assert sorted(losses) == sorted(weights)
    assert all(losses[k].item() == 0 for k in weights if "_dn" in k)


def test_non_finite_predictions_are_named_before_matching():
    """scipy's assignment fails on NaN costs with "matrix contains invalid numeric entries", naming nothing."""
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    pred = Prediction(torch.randn(2, 4, 3), torch.rand(2, 4, 4) * 0.5 + 0.1)
    diverged = Prediction(pred.logits.clone(), pred.boxes.clone())
    diverged.logits[1, 2, 0] = float("nan")
    diverged.boxes[0, 0, 3] = float("inf")
    outputs = LossInputs(pred, decoder_aux=[diverged], proposals=pred)
    targets = [Target(torch.tensor([2]), torch.tensor([[0.5, 0.5, 0.2, 0.3]]))] * 2
    with EventStorage(start_iter=7):
        with pytest.raises(
            FloatingPointError,
            match=r"Non-finite predictions at iteration 7: logits \(loss_ce_0\), "
            r"boxes \(loss_bbox_0\) hold NaN or infinity",
        ):
            _criterion()(outputs, targets)
    with pytest.raises(FloatingPointError, match="outside a trainer"):
        _criterion()(outputs, targets)
