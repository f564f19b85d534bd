"""Focus-DETR / Salience-DETR token targets and losses on hand-computed cases.

Token centres are (j + 0.5) / valid width, (i + 0.5) / valid height, times the image size in pixels; the cases use
sizes that are powers of two so that every coordinate is exact in float32.
"""

import math

import pytest
import torch
from fvcore.nn import sigmoid_focal_loss

from sparse_detr.modeling.levels import FlatLevels
from sparse_detr.modeling.score_targets import (
    FCOS_LEVEL_RANGES,
    foreground_score_loss,
    foreground_target,
    level_ranges_from_bounds,
    salience_score_loss,
    salience_target,
    token_centres,
)
from sparse_detr.modeling.structures import Target

UNBOUNDED = ((-1.0, math.inf),)


def _levels(n, shapes, valid=None):
    """FlatLevels of n images; valid: per image per level (h, w) of the unpadded part (default: all)."""
    masks = []
    for lvl, (h, w) in enumerate(shapes):
        m = torch.ones(n, h, w, dtype=torch.bool)
        for i in range(n):
            vh, vw = valid[i][lvl] if valid else (h, w)
            m[i, :vh, :vw] = False
        masks.append(m)
    return FlatLevels.from_masks(masks)


def _target(*xyxy_norm):
    """A target of normalized xyxy boxes (class 0), as cxcywh."""
    b = torch.tensor(xyxy_norm, dtype=torch.float32).view(-1, 4)
    cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
    return Target(torch.zeros(len(b), dtype=torch.long), cxcywh)


def _px(size, *xyxy_px):
    """A target of boxes given in pixels of a square image of side `size`."""
    return _target(*[c / size for c in xyxy_px])


def _grid(h, w, ones):
    """[h * w] with 1 at the (row, col) in `ones`."""
    g = torch.zeros(h, w)
    for r, c in ones:
        g[r, c] = 1
    return g.flatten()


def test_token_centres_use_the_valid_area_of_each_image():
    # 2 x 4 tokens; image 1 covers the left 2 columns only
    levels = _levels(2, [(2, 4)], valid=[[(2, 4)], [(2, 2)]])
    c = token_centres(levels)
    assert torch.equal(c[0, :4, 0], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert torch.equal(c[1, :4, 0], torch.tensor([0.25, 0.75, 1.25, 1.75]))
    assert torch.equal(c[1, ::4, 1], torch.tensor([0.25, 0.75]))


# 512 x 512 image, 4 levels of strides 64, 128, 256, 512: token centres at 32 + 64 j, 64 + 128 j, 128 + 256 j, 256
FOUR_LEVELS = [(8, 8), (4, 4), (2, 2), (1, 1)]


def _per_level(t):
    return torch.split(t, [64, 16, 4, 1])


def test_default_ranges_lower_bound_excluded_upper_bound_included():
    targets = [
        # token (32, 32): max(l, t, r, b) = 64 -> level 0 (-1, 64], upper bound included;
        # level-1 token (64, 64): 64 -> not level 1 (64, 128], lower bound excluded; 96 is on the edge
        _px(512, 0, 0, 96, 96),
        # level-1 token (64, 64): max(64, 64, 128, 128) = 128 -> level 1; level 0 tokens inside reach >= 96;
        # level-2 token (128, 128): 128 -> not level 2 (128, 256]; level-1 token (192, 64) lies on the edge
        _px(512, 0, 0, 192, 192),
        # level-1 token (64, 64): 64 from the top-left edges, 66 from the others -> level 1 (just);
        # level-2 token (128, 128): 128 -> not level 2
        _px(512, 0, 0, 130, 130),
        # every level-0 token reaches >= 96 and the level-1 token (64, 64) exactly 64; the level-2 token
        # (128, 128) lies on the right and bottom edges: background everywhere
        _px(512, 0, 0, 128, 128),
    ]
    levels = _levels(4, FOUR_LEVELS)
    fg = foreground_target(targets, levels, [(512, 512)] * 4)
    assert fg.shape == (4, 85)

    expected = torch.zeros(4, 85)
    expected[0, 0] = 1  # level 0, token (0, 0)
    expected[1, 64] = 1  # level 1, token (0, 0)
    expected[2, 64] = 1
    assert torch.equal(fg, expected)
    assert FCOS_LEVEL_RANGES[:3] == ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0))


def test_large_box_is_foreground_on_the_coarse_level_only():
    # a box over the whole 512 x 512 image: the level-3 token (256, 256) reaches 256, not in level 3's (256, inf);
    # the level-2 tokens (128 or 384 per axis) reach 384, not in (128, 256]; finer tokens reach further: nothing.
    # Over a 1024 x 1024 image the distances double: the level-3 token (512) is foreground, the level-2 tokens
    # (768) are not.
    levels = _levels(2, FOUR_LEVELS)
    fg = foreground_target([_target(0, 0, 1, 1), _target(0, 0, 1, 1)], levels, [(512, 512), (1024, 1024)])
    assert fg[0].sum() == 0
    l0, l1, l2, l3 = _per_level(fg[1])
    assert l3.tolist() == [1.0] and l0.sum() == 0 and l1.sum() == 0 and l2.sum() == 0


def test_overlapping_boxes():
    # 4 x 4 pixel image, one level of 4 x 4 tokens (centres 0.5 .. 3.5), level range (-1, 2]
    # box A = the whole image: every token reaches >= 2.5 -> never in the level
    # box B = [1, 3] x [1, 3]: its 4 tokens reach 1.5 -> foreground, whatever A says
    ranges = ((-1.0, 2.0),)
    levels = _levels(1, [(4, 4)])
    targets = [_px(4, 0, 0, 4, 4, 1, 1, 3, 3)]
    fg = foreground_target(targets, levels, [(4, 4)], ranges)
    inner = [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert torch.equal(fg[0], _grid(4, 4, inner))

    # salience: from B, 1 - sqrt(0.5^2 + 0.5^2) / 2 = 1 - sqrt(2)/4 = 0.6464; from A, whose centre is nearer,
    # dx = dy = +-1/4: 1 - sqrt(2)/8 = 0.8232. As Salience-DETR's code, the largest over all boxes containing
    # the token counts, also A, which is not of this level.
    sal = salience_target(targets, levels, [(4, 4)], ranges)
    assert torch.allclose(sal[0], _grid(4, 4, inner) * (1 - math.sqrt(2) / 8), atol=1e-6)
    # without A, B's own value
    sal_b = salience_target([_px(4, 1, 1, 3, 3)], levels, [(4, 4)], ranges)
    assert torch.allclose(sal_b[0], _grid(4, 4, inner) * (1 - math.sqrt(2) / 4), atol=1e-6)


def test_salience_is_centre_weighted_and_scale_independent():
    # a box over the whole image, every token of the (single) level inside and in range
    dy = torch.tensor([-0.75, -0.25, 0.25, 0.75])
    expected = (1 - torch.sqrt(dy[:, None] ** 2 + dy[None, :] ** 2) / 2).flatten()
    assert math.isclose(expected[0].item(), 1 - 0.75 * math.sqrt(2) / 2, rel_tol=1e-6)  # corner token
    for side in (4, 8, 64):  # 4 x 4 tokens over 4, 8, 64-pixel images
        sal = salience_target([_target(0, 0, 1, 1)], _levels(1, [(4, 4)]), [(side, side)], UNBOUNDED)
        assert torch.allclose(sal[0], expected, atol=1e-6)
    # a box centred on a token gives it 1
    sal = salience_target([_px(4, 1, 1, 2, 2)], _levels(1, [(4, 4)]), [(4, 4)], UNBOUNDED)
    assert torch.allclose(sal[0], _grid(4, 4, [(1, 1)]))


def test_token_centre_on_a_box_edge_is_outside():
    # box [0, 1.5] x [0, 4] pixels: the column-1 tokens (x = 1.5) lie on its right edge -> background
    levels = _levels(1, [(4, 4)])
    targets = [_px(4, 0, 0, 1.5, 4)]
    fg = foreground_target(targets, levels, [(4, 4)], UNBOUNDED)
    assert torch.equal(fg[0], _grid(4, 4, [(r, 0) for r in range(4)]))
    # column 0 (x = 0.5): dx = (0.5 - 1) / 1.5 = -1/3; dy = (y - (4 - y)) / 4
    sal = salience_target(targets, levels, [(4, 4)], UNBOUNDED)
    expected = [1 - math.sqrt(1 / 9 + d**2) / 2 for d in (-0.75, -0.25, 0.25, 0.75)]
    assert torch.allclose(sal[0].view(4, 4)[:, 0], torch.tensor(expected), atol=1e-6)
    assert math.isclose(expected[1], 19 / 24, rel_tol=1e-6)  # sqrt(1/9 + 1/16) = 5/12
    assert sal[0].view(4, 4)[:, 1:].sum() == 0


def test_padded_tokens_are_never_positive():
    # 2 x 4 tokens; image 0 is 2 x 4 pixels, image 1 is 2 x 2 pixels (columns 2 and 3 padded)
    levels = _levels(2, [(2, 4)], valid=[[(2, 4)], [(2, 2)]])
    sizes = [(2, 4), (2, 2)]
    # image 1's box: its left half; its valid tokens are at x = 0.5 and 1.5 pixels, so only column 0 is inside
    # (normalizing by the padded width would put columns 0 and 1 inside)
    fg = foreground_target([_target(0, 0, 1, 1), _target(0, 0, 0.5, 1)], levels, sizes, UNBOUNDED)
    assert torch.equal(fg[0], torch.ones(8))
    assert torch.equal(fg[1], _grid(2, 4, [(0, 0), (1, 0)]))
    # a box reaching past the image (x up to 2, normalized) would cover the padded tokens (x = 1.25, 1.75)
    for fn in (foreground_target, salience_target):
        t = fn([_target(0, 0, 1, 1), _target(0, 0, 2, 1)], levels, sizes, UNBOUNDED)
        assert torch.equal(t[1] > 0, ~levels.padding_mask[1])


def test_empty_images():
    levels = _levels(2, FOUR_LEVELS)
    empty = Target(torch.zeros(0, dtype=torch.long), torch.zeros(0, 4))
    for fn in (foreground_target, salience_target):
        # an empty image beside one with a box: all zero
        t = fn([empty, _px(512, 0, 0, 96, 96)], levels, [(512, 512)] * 2)
        assert t[0].sum() == 0 and t[1].sum() > 0
        # no box in the batch
        assert torch.equal(fn([empty, empty], levels, [(512, 512)] * 2), torch.zeros(2, 85))
    scores = torch.randn(2, 85, generator=torch.Generator().manual_seed(0), requires_grad=True)
    valid = ~levels.padding_mask
    zero = torch.zeros(2, 85)
    for loss_fn in (foreground_score_loss, salience_score_loss):
        loss = loss_fn(scores, zero, valid)
        loss.backward()
        assert torch.isfinite(loss) and loss > 0 and torch.isfinite(scores.grad).all()
        scores.grad = None


def _focal(x, t, alpha=0.25, gamma=2.0):
    """Binary focal loss of one logit, written out."""
    p = 1 / (1 + math.exp(-x))
    if t == 1:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p**gamma * math.log(1 - p)


def test_foreground_score_loss_per_image_over_its_positives_then_mean():
    scores = torch.tensor([[2.0, -1.0, 0.5, 1.5], [0.0, 3.0, -2.0, 9.0]])
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    image0 = (_focal(2.0, 1) + _focal(-1.0, 0) + _focal(0.5, 1) + _focal(1.5, 0)) / 2
    image1 = (_focal(0.0, 0) + _focal(3.0, 0) + _focal(-2.0, 0)) / 1  # no positive: over 1; 9.0 is padding
    loss = foreground_score_loss(scores, target, valid)
    assert math.isclose(loss.item(), (image0 + image1) / 2, rel_tol=1e-5)
    # padded scores do not count
    assert torch.equal(loss, foreground_score_loss(scores.where(valid, -5.0), target, valid))


def test_salience_score_loss_soft_targets_over_batch_positives():
    scores = torch.tensor([[1.0, -0.5, 0.25], [2.0, -3.0, 7.0]])
    target = torch.tensor([[0.5, 0.0, 0.8], [0.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])

    def term(x, t, alpha=0.25, gamma=2.0):
        p = 1 / (1 + math.exp(-x))
        bce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        return bce * ((1 - alpha) * p**gamma * (1 - t) + alpha * t * (1 - p) ** gamma)

    pairs = [(1.0, 0.5), (-0.5, 0.0), (0.25, 0.8), (2.0, 0.0), (-3.0, 1.0)]
    expected = sum(term(x, t) for x, t in pairs) / 3  # 3 valid tokens with t > 0
    loss = salience_score_loss(scores, target, valid)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)

    # on a binary target it is the sigmoid focal loss, summed, over the positives
    binary = (target > 0.6).float()  # 2 positives
    focal = sigmoid_focal_loss(scores, binary, alpha=0.25, gamma=2.0, reduction="none")[valid].sum()
    assert torch.allclose(salience_score_loss(scores, binary, valid), focal / 2)


def test_bad_inputs_are_named():
    levels = _levels(1, FOUR_LEVELS)
    box = _px(512, 0, 0, 96, 96)
    with pytest.raises(ValueError, match="level_ranges"):
        foreground_target([box], levels, [(512, 512)], UNBOUNDED)
    with pytest.raises(ValueError, match="image_sizes"):
        foreground_target([box], levels, [(512, 512, 3)])
    with pytest.raises(ValueError, match="targets"):
        salience_target([box, box], levels, [(512, 512)])
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        salience_target([Target(torch.zeros(2, dtype=torch.long), torch.zeros(2, 5))], levels, [(512, 512)])
    with pytest.raises(ValueError, match="foreground_score_loss"):
        foreground_score_loss(torch.zeros(1, 3), torch.zeros(1, 4), torch.ones(1, 3, dtype=torch.bool))


def test_level_ranges_from_the_config_bounds():
    assert level_ranges_from_bounds([64, 128, 256], 4) == FCOS_LEVEL_RANGES
    assert level_ranges_from_bounds([10.0], 2) == ((-1.0, 10.0), (10.0, math.inf))
    assert level_ranges_from_bounds([], 1) == ((-1.0, math.inf),)
    for bounds in ([64, 128], [64, 64, 256], [128, 64, 256], [0, 64, 128]):
        with pytest.raises(ValueError, match="SCORE_LEVEL_BOUNDS must hold 3 increasing positive bounds"):
            level_ranges_from_bounds(bounds, 4)
