"""DINO's contrastive denoising queries: layout, attention mask, noise law, determinism, fixed matching."""

import pytest
import torch

from sparse_detr.modeling.criterion import SetCriterion
from sparse_detr.modeling.denoising import build_denoising_queries, denoising_match_indices
from sparse_detr.modeling.matcher import HungarianMatcher
from sparse_detr.modeling.structures import Target


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _targets(counts, num_classes=5, seed=0):
    """Images with the given numbers of targets: random labels, small boxes away from the image border (so that
    no noise, up to 2 half-sizes, is clamped)."""
    g = _gen(1000 + seed)
    out = []
    for n in counts:
        centre = 0.3 + 0.4 * torch.rand(n, 2, generator=g)
        size = 0.05 + 0.1 * torch.rand(n, 2, generator=g)
        out.append(Target(torch.randint(0, num_classes, (n,), generator=g), torch.cat([centre, size], 1)))
    return out


def _build(targets, dn_number=4, label_noise_ratio=0.5, box_noise_scale=1.0, num_matching_queries=3, seed=0):
    return build_denoising_queries(
        targets,
        num_classes=5,
        dn_number=dn_number,
        label_noise_ratio=label_noise_ratio,
        box_noise_scale=box_noise_scale,
        num_matching_queries=num_matching_queries,
        generator=_gen(seed),
    )


def _xyxy(b):
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def test_shapes_groups_and_padding():
    # T = (2, 1): T_max = 2, G = 4 // 2 = 2 groups of 2 positives + 2 negatives
    targets = _targets([2, 1])
    dq = _build(targets)
    assert (dq.num_groups, dq.max_targets, dq.num_queries, dq.num_targets) == (2, 2, 8, [2, 1])
    assert dq.labels.shape == (2, 8) and dq.boxes.shape == (2, 8, 4) and dq.valid.shape == (2, 8)
    assert dq.attn_mask.shape == (11, 11) and dq.attn_mask.dtype == torch.bool
    # image 1 has one target: slot 1 of every half is padding, with label num_classes and box 0.5 (zero logits)
    assert dq.valid[0].all()
    assert dq.valid[1].tolist() == [True, False] * 4
    assert (dq.labels[1, 1::2] == 5).all() and (dq.boxes[1, 1::2] == 0.5).all()
    assert (dq.unactivated_boxes()[1, 1::2] == 0).all()
    assert dq.positive_mask().tolist() == [True, True, False, False] * 2
    assert ((dq.boxes >= 0) & (dq.boxes <= 1)).all()
    # G = max(1, dn_number // T_max): 100 // 7 = 14 groups; more targets than the budget still give 1 group
    assert _build(_targets([7, 3]), dn_number=100).num_groups == 14
    assert _build(_targets([9]), dn_number=4).num_groups == 1
    # the decoder's output on all 8 + 3 queries splits into the denoising and the matching part
    dn, matching = dq.split(torch.arange(22.0).view(2, 11))
    assert dn.tolist() == [list(range(8)), list(range(11, 19))] and matching.tolist() == [[8, 9, 10], [19, 20, 21]]


def test_attention_mask_element_by_element():
    # 2 groups, T_max = 2, 3 matching queries: rows attend, columns are attended, X = blocked
    dq = _build(_targets([2, 2]), dn_number=5)
    assert (dq.num_groups, dq.max_targets) == (2, 2)
    expected = [
        "....XXXX...",  # group 0 (queries 0-3): itself and the matching queries
        "....XXXX...",
        "....XXXX...",
        "....XXXX...",
        "XXXX.......",  # group 1 (queries 4-7)
        "XXXX.......",
        "XXXX.......",
        "XXXX.......",
        "XXXXXXXX...",  # matching queries (8-10): no denoising query
        "XXXXXXXX...",
        "XXXXXXXX...",
    ]
    assert dq.attn_mask.tolist() == [[c == "X" for c in row] for row in expected]


def test_an_image_without_targets_beside_others():
    dq = _build(_targets([0, 2]))
    assert (dq.num_groups, dq.num_queries) == (2, 8)
    assert not dq.valid[0].any() and dq.valid[1].all()
    assert (dq.labels[0] == 5).all() and (dq.boxes[0] == 0.5).all()
    indices = denoising_match_indices(dq)
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0
    assert indices[1][0].tolist() == [0, 1, 4, 5] and indices[1][1].tolist() == [0, 1, 0, 1]


def test_a_batch_without_targets_has_no_denoising_queries():
    dq = _build(_targets([0, 0]))
    assert (dq.num_groups, dq.num_queries) == (0, 0)
    assert dq.labels.shape == (2, 0) and dq.boxes.shape == (2, 0, 4) and dq.valid.shape == (2, 0)
    assert dq.attn_mask.shape == (3, 3) and not dq.attn_mask.any()
    assert all(src.numel() == 0 and tgt.numel() == 0 for src, tgt in denoising_match_indices(dq))
    outputs = torch.randn(2, 3, 7)
    dn, matching = dq.split(outputs)
    assert dn.shape == (2, 0, 7) and torch.equal(matching, outputs)


def test_match_indices_point_positives_at_their_targets():
    targets = _targets([3, 1, 2])
    dq = _build(targets, dn_number=9, label_noise_ratio=0.0, box_noise_scale=0.0)
    assert (dq.num_groups, dq.max_targets) == (3, 3)
    indices = denoising_match_indices(dq)
    positive = dq.positive_mask()
    for i, (t, (src, tgt)) in enumerate(zip(targets, indices)):
        assert src.dtype == tgt.dtype == torch.int64 and len(src) == 3 * len(t.labels)
        assert positive[src].all() and dq.valid[i, src].all()
        # without noise the queries are their targets
        assert torch.equal(dq.labels[i, src], t.labels[tgt]) and torch.equal(dq.boxes[i, src], t.boxes[tgt])
        # every valid positive is matched once; the negatives sit T_max further
        assert sorted(src.tolist()) == torch.nonzero(positive & dq.valid[i]).flatten().tolist()
        assert torch.equal(dq.boxes[i, src + dq.max_targets], t.boxes[tgt])
    assert indices[0][0].tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14]
    assert indices[0][1].tolist() == [0, 1, 2] * 3


def test_match_indices_feed_the_set_losses():
    # the criterion's losses take the fixed indices in place of the matcher's: predictions equal to the
    # noise-free queries have zero box losses, and moving an unmatched (negative) prediction changes none
    targets = _targets([3, 0, 2])
    dq = _build(targets, dn_number=6, label_noise_ratio=0.0, box_noise_scale=0.0)
    indices = denoising_match_indices(dq)
    criterion = SetCriterion(num_classes=5, matcher=HungarianMatcher(), weight_dict={})
    boxes = dq.boxes.clone()
    boxes[:, 3:6] = 0.3  # the negatives of group 0
    loss_bbox, loss_giou = criterion.loss_boxes(boxes, targets, indices, num_boxes=5.0 * dq.num_groups)
    assert loss_bbox.item() == 0 and abs(loss_giou.item()) < 1e-6
    logits = torch.zeros(3, dq.num_queries, 5)
    assert torch.isfinite(criterion.loss_labels(logits, targets, indices, num_boxes=5.0 * dq.num_groups))


def test_same_seed_same_queries_other_seed_other_noise_global_rng_untouched():
    targets = _targets([4, 2])
    state = torch.get_rng_state()
    a, b = _build(targets, seed=7), _build(targets, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.boxes, b.boxes)
    c = _build(targets, seed=8)
    assert not torch.equal(a.boxes, c.boxes)
    assert not torch.equal(a.labels, c.labels)


def test_box_noise_bound_positives_within_lambda_negatives_between_lambda_and_two_lambda():
    # away from the border nothing is clamped, so each corner moved by u * lambda half-sizes, u < 1 for positives
    # and 1 <= u < 2 for negatives; a negative whose corners crossed (at lambda = 1, whenever its left corner moved
    # right and its right corner left) is stored with width 0 on that axis, as DINO's decoder sees it
    targets = _targets([30, 17, 25], seed=3)
    for scale in (1.0, 0.4):
        dq = _build(targets, dn_number=200, label_noise_ratio=0.0, box_noise_scale=scale)
        positive = dq.positive_mask()
        for i, t in enumerate(targets):
            gt = dq.boxes.new_zeros(dq.num_queries, 4)
            slots = torch.arange(dq.num_queries) % dq.max_targets
            gt[dq.valid[i]] = t.boxes[slots[dq.valid[i]]]
            pos, neg = positive & dq.valid[i], ~positive & dq.valid[i]
            crossed = (dq.boxes[i, :, 2:] == 0).any(-1)
            assert not crossed[pos].any()
            assert crossed[neg].any() == (scale == 1.0)
            kept = ~crossed
            # corner moves in units of lambda half-sizes
            u = (_xyxy(dq.boxes[i]) - _xyxy(gt)).abs() / (gt[:, 2:].repeat(1, 2) / 2 * scale)
            u_pos, u_neg = u[pos & kept], u[neg & kept]
            assert (u_pos < 1 + 1e-4).all() and (u_neg > 1 - 1e-4).all() and (u_neg < 2 + 1e-4).all()
            # so a positive is closer to its target than any negative, corner by corner, in half-sizes
            assert u_pos.max() < u_neg.min() + 1e-4
            # and the draws fill both intervals
            assert u_pos.min() < 0.1 and u_pos.max() > 0.9 and u_neg.min() < 1.1 and u_neg.max() > 1.9


def test_label_noise_rate():
    # 4 images x 100 targets x 10 groups x 2 halves = 8000 queries. DINO resamples a label with probability
    # ratio / 2 uniformly over the 5 classes, so it changes with probability 0.5 / 2 * 4 / 5 = 0.2 (standard
    # deviation of the share 0.0045: the bound is 6.7 of them, and the seed is fixed).
    targets = _targets([100] * 4, seed=5)
    dq = _build(targets, dn_number=1000, label_noise_ratio=0.5, box_noise_scale=0.0)
    assert dq.num_groups == 10
    gt = torch.stack([t.labels for t in targets]).repeat(1, 20)
    changed = (dq.labels != gt).float().mean().item()
    assert abs(changed - 0.2) < 0.03
    assert ((dq.labels >= 0) & (dq.labels < 5)).all()
    # no label noise: every label kept
    assert torch.equal(_build(targets, dn_number=1000, label_noise_ratio=0.0).labels, gt)


def test_bad_arguments_are_named():
    targets = _targets([1])
    for kwargs, name in [
        ({"dn_number": 0}, "dn_number"),
        ({"label_noise_ratio": 1.5}, "label_noise_ratio"),
        ({"box_noise_scale": -0.1}, "box_noise_scale"),
        ({"num_matching_queries": 0}, "num_matching_queries"),
    ]:
        with pytest.raises(ValueError, match=name):
            _build(targets, **kwargs)
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        _build([Target(torch.zeros(2, dtype=torch.long), torch.zeros(3, 4))])
    with pytest.raises(ValueError, match="targets"):
        _build([])
