"""Box-derived targets for the token scoring network, and their losses: Focus-DETR's foreground target and
Salience-DETR's salience target, alternatives to Sparse DETR's DAM target (:mod:`.dam`).

Both papers assign a token to an object the way FCOS assigns locations: the token's centre must lie strictly inside
the box, and the largest of its four distances to the box edges, max(l, t, r, b) in input-image pixels, must fall in
its level's range (lower bound excluded, upper bound included). So a large box is foreground on a coarse level and
background on a fine one, and which level takes a token depends on where in the box it lies, not on the box size
alone. Token centres are those of the two-stage anchors (`encoder_output_proposals`): (j + 0.5) / valid width,
(i + 0.5) / valid height of the unpadded image area, scaled to pixels by the image size.

Sources (facts read from the public code; nothing copied):
- Focus-DETR (Zheng et al., ICCV 2023, "Less is More: Focus Attention for Efficient DETR", foreground token
  selector): IDEA-Research/detrex `projects/focus_detr/modeling/foreground_supervision.py` (`GenTargets`,
  `compute_cls_loss`) and `two_stage_criterion.py` (levels' strides 8..64, ranges, weight 1.5).
- Salience-DETR (Hou et al., CVPR 2024, scale-independent salience supervision): xiuqhou/Salience-DETR
  `models/detectors/salience_detr.py` (`SalienceCriterion`) and `models/bricks/losses.py` (`sigmoid_focal_loss`).

Both references compute the token's pixel position as (j + 0.5) * stride of the padded feature map and include
padded tokens in their losses as background; here padded tokens are excluded (the losses take a `valid` mask,
``~levels.padding_mask``) and positions use the valid area, as the rest of this model does.
"""

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from fvcore.nn import sigmoid_focal_loss
from torch import Tensor
from torchvision.ops import box_convert

from .levels import FlatLevels, valid_sizes
from .structures import Target

__all__ = [
    "FCOS_LEVEL_RANGES",
    "level_ranges_from_bounds",
    "token_centres",
    "foreground_target",
    "salience_target",
    "foreground_score_loss",
    "salience_score_loss",
]

# (lower, upper] of max(l, t, r, b) in input pixels per level, finest (stride 8) first: Focus-DETR's
# `limit_range` (its last bound 999999, Salience-DETR's 99999: both mean "no bound")
FCOS_LEVEL_RANGES: Tuple[Tuple[float, float], ...] = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, math.inf))

ImageSizes = Union[Tensor, Sequence[Tuple[int, int]]]


def level_ranges_from_bounds(bounds: Sequence[float], num_levels: int) -> Tuple[Tuple[float, float], ...]:
    """The (lower, upper] ranges of `num_levels` levels from the upper bounds of all but the last: level 0 from -1,
    level l from bounds[l - 1], the last one unbounded. (64, 128, 256) gives :data:`FCOS_LEVEL_RANGES`.

    Raises:
        ValueError: naming MODEL.SPARSE_DETR.SCORE_LEVEL_BOUNDS, unless there are num_levels - 1 increasing,
            positive bounds.
    """
    bounds = [float(b) for b in bounds]
    if len(bounds) != num_levels - 1 or any(b <= 0 for b in bounds) or sorted(set(bounds)) != bounds:
        raise ValueError(
            f"MODEL.SPARSE_DETR.SCORE_LEVEL_BOUNDS must hold {num_levels - 1} increasing positive bounds in pixels "
            f"(one per level but the last, NUM_FEATURE_LEVELS = {num_levels}), got {bounds}"
        )
    lowers = [-1.0] + bounds
    return tuple(zip(lowers, bounds + [math.inf]))


def token_centres(levels: FlatLevels) -> Tensor:
    """Centre of every token, normalized by its image's valid (unpadded) area at the token's level.

    Returns:
        [N, S, 2] (x, y): ((j + 0.5) / valid W_l, (i + 0.5) / valid H_l) for the token in row i, column j of level
        l; padded tokens get values above 1.
    """
    centres = []
    for mask in levels.level_masks():
        n, h, w = mask.shape
        ys = torch.arange(h, dtype=torch.float32, device=mask.device)
        xs = torch.arange(w, dtype=torch.float32, device=mask.device)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).view(1, h * w, 2)
        scale = valid_sizes(mask).flip(-1).to(torch.float32).view(n, 1, 2)
        centres.append((grid + 0.5) / scale)
    return torch.cat(centres, 1)


class _Assignment(NamedTuple):
    """Per image, token and box (boxes padded to the batch's largest count), each [N, S, T]."""

    left: Tensor  # pixel distances from the token centre to the box's left edge, ...
    top: Tensor
    right: Tensor
    bottom: Tensor
    inside: Tensor  # bool: the centre lies strictly inside the box (a real one, not padding)
    in_level: Tensor  # bool: max(l, t, r, b) lies in the range of the token's level


def _assign(
    targets: List[Target], levels: FlatLevels, image_sizes: ImageSizes, level_ranges: Sequence[Tuple[float, float]]
) -> Optional[_Assignment]:
    """The token-box geometry both targets read; None when the batch has no box."""
    n, num_levels = levels.padding_mask.shape[0], len(levels.shapes)
    if len(targets) != n:
        raise ValueError(f"targets: got {len(targets)} images, the levels hold {n}")
    if len(level_ranges) != num_levels:
        raise ValueError(f"level_ranges: got {len(level_ranges)} (lower, upper) pairs for {num_levels} levels")
    device = levels.padding_mask.device
    sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=device)
    if sizes.shape != (n, 2):
        raise ValueError(f"image_sizes: expected [{n}, 2] (height, width) in pixels, got {tuple(sizes.shape)}")
    for i, t in enumerate(targets):
        if t.boxes.dim() != 2 or t.boxes.shape[-1] != 4 or t.boxes.shape[0] != t.labels.shape[0]:
            raise ValueError(
                f"targets[{i}]: boxes must be [T, 4] with T = len(labels), got boxes {tuple(t.boxes.shape)} "
                f"and labels {tuple(t.labels.shape)}"
            )
    num_boxes = max((len(t.boxes) for t in targets), default=0)
    if num_boxes == 0:
        return None

    # [N, T, 4] xyxy in pixels; the padding boxes are marked invalid
    boxes = torch.zeros(n, num_boxes, 4, device=device)
    box_valid = torch.zeros(n, num_boxes, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        boxes[i, : len(t.boxes)] = box_convert(t.boxes.to(device, torch.float32), "cxcywh", "xyxy")
        box_valid[i, : len(t.boxes)] = True
    wh = sizes.flip(-1)
    boxes = boxes * wh.repeat(1, 2)[:, None]
    xy = token_centres(levels) * wh[:, None]  # [N, S, 2] pixels

    x, y = xy[..., 0, None], xy[..., 1, None]
    ltrb = torch.stack(
        [x - boxes[:, None, :, 0], y - boxes[:, None, :, 1], boxes[:, None, :, 2] - x, boxes[:, None, :, 3] - y], -1
    )
    # a centre on an edge (a zero distance) is outside, as in both references
    inside = (ltrb.amin(-1) > 0) & box_valid[:, None]
    reach = ltrb.amax(-1)
    num_tokens = torch.tensor([h * w for h, w in levels.shapes], device=device)
    bounds = torch.tensor(level_ranges, dtype=torch.float32, device=device).repeat_interleave(num_tokens, 0)
    in_level = (reach > bounds[None, :, 0, None]) & (reach <= bounds[None, :, 1, None])
    return _Assignment(*ltrb.unbind(-1), inside, in_level)


def _foreground(a: _Assignment, padding_mask: Tensor) -> Tensor:
    """[N, S] bool: the token lies in some box of its level; padded tokens never do."""
    return (a.inside & a.in_level).any(-1) & ~padding_mask


def foreground_target(
    targets: List[Target],
    levels: FlatLevels,
    image_sizes: ImageSizes,
    level_ranges: Sequence[Tuple[float, float]] = FCOS_LEVEL_RANGES,
) -> Tensor:
    """Focus-DETR's foreground target of the token scores.

    A token of level l is 1 when its centre lies strictly inside a ground-truth box (a centre exactly on an edge is
    outside) and its largest distance to that box's edges, max(l, t, r, b) in pixels, lies in
    (level_ranges[l][0], level_ranges[l][1]]; else 0. Padded tokens are 0 and must be left out of the loss: the
    valid mask is ``~levels.padding_mask`` (see :func:`foreground_score_loss`).

    Args:
        targets: per image; boxes normalized cxcywh (by the image size before padding).
        levels: the token layout (shapes and padding mask).
        image_sizes: [N, 2] (height, width) of the images before padding, in the pixels of the network input (what
            the ranges are measured in): detectron2's ``ImageList.image_sizes``.
        level_ranges: per level (lower, upper] of max(l, t, r, b) in pixels; Focus-DETR's by default, which are
            meant for 4 levels of strides 8, 16, 32, 64.
    Returns:
        [N, S] float32 in {0, 1}.
    """
    a = _assign(targets, levels, image_sizes, level_ranges)
    if a is None:
        return torch.zeros(levels.padding_mask.shape, device=levels.padding_mask.device)
    return _foreground(a, levels.padding_mask).float()


def salience_target(
    targets: List[Target],
    levels: FlatLevels,
    image_sizes: ImageSizes,
    level_ranges: Sequence[Tuple[float, float]] = FCOS_LEVEL_RANGES,
) -> Tensor:
    """Salience-DETR's scale-independent salience target of the token scores.

    A token inside a box gets from it 1 - sqrt(dx^2 + dy^2) / 2 with dx = (l - r) / (l + r), dy = (t - b) / (t + b)
    (l, t, r, b: its distances to the box edges), i.e. its offset from the box centre in units of half the box
    size: 1 at the centre, 1/2 at an edge's midpoint, 1 - sqrt(2)/2 at a corner, the same for every box size. The
    target is the largest such value over the boxes the token lies strictly inside, kept where the token is
    foreground in the sense of :func:`foreground_target` (inside a box of its level) and 0 elsewhere. As in
    Salience-DETR's code, the largest value is taken over all boxes containing the token, also those of other
    levels (a token inside a box of its level and in a box of another gets the larger of the two). Padded tokens
    are 0; the valid mask is ``~levels.padding_mask``. (Salience-DETR's optional uniform noise on the target,
    `noise_scale`, is 0 in all its configs and left out.)

    Args: as :func:`foreground_target` (the same default ranges: Salience-DETR's `limit_range`).
    Returns:
        [N, S] float32 in [0, 1].
    """
    a = _assign(targets, levels, image_sizes, level_ranges)
    if a is None:
        return torch.zeros(levels.padding_mask.shape, device=levels.padding_mask.device)
    # inside a box both sums are > 0; outside, the clamp only keeps the discarded values finite
    dx = (a.left - a.right) / (a.left + a.right).clamp(min=1e-6)
    dy = (a.top - a.bottom) / (a.top + a.bottom).clamp(min=1e-6)
    per_box = torch.where(a.inside, 1 - torch.sqrt(dx**2 + dy**2) / 2, 0.0)
    return torch.where(_foreground(a, levels.padding_mask), per_box.amax(-1), 0.0)


def _check_loss_inputs(name: str, scores: Tensor, target: Tensor, valid: Tensor) -> None:
    if scores.dim() != 2 or target.shape != scores.shape or valid.shape != scores.shape:
        raise ValueError(
            f"{name}: scores, target and valid must all be [N, S], got {tuple(scores.shape)}, {tuple(target.shape)} "
            f"and {tuple(valid.shape)}"
        )


def foreground_score_loss(
    scores: Tensor, target: Tensor, valid: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Focus-DETR's loss of the foreground scores: the sigmoid focal loss summed over each image's valid tokens,
    over that image's number of foreground tokens (at least 1), averaged over the images (Focus-DETR's
    `compute_cls_loss(...).mean()`, whose focal loss is the standard one on a binary target).

    Args:
        scores: [N, S] logits.
        target: [N, S] in {0, 1} (:func:`foreground_target`).
        valid: [N, S] bool, False on padded tokens, which do not count.
        alpha, gamma: focal parameters (Focus-DETR: 0.25, 2).
    Returns:
        scalar.
    """
    _check_loss_inputs("foreground_score_loss", scores, target, valid)
    target = target.to(scores.dtype)
    loss = sigmoid_focal_loss(scores, target, alpha=alpha, gamma=gamma, reduction="none")
    loss = torch.where(valid, loss, 0.0).sum(1)
    num_pos = (target * valid).sum(1).clamp(min=1)
    return (loss / num_pos).mean()


def salience_score_loss(
    scores: Tensor, target: Tensor, valid: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Salience-DETR's loss of the salience scores: binary cross-entropy against the soft target t, weighted by
    (1 - alpha) * p^gamma * (1 - t) + alpha * t * (1 - p)^gamma (p = sigmoid(score); the weight keeps its
    gradient, as the reference), summed over the batch's valid tokens, over the batch's number of tokens with
    t > 0 (at least 1; not averaged across workers, as the reference).

    On a binary target this is the sigmoid focal loss; on a soft one it differs from
    `fvcore.nn.sigmoid_focal_loss` (whose modulating factor uses p_t = p t + (1 - p)(1 - t)).

    Args:
        scores: [N, S] logits.
        target: [N, S] in [0, 1] (:func:`salience_target`).
        valid: [N, S] bool, False on padded tokens, which do not count.
        alpha, gamma: focal parameters (Salience-DETR: 0.25, 2).
    Returns:
        scalar.
    """
    _check_loss_inputs("salience_score_loss", scores, target, valid)
    target = target.to(scores.dtype)
    prob = scores.sigmoid()
    weight = (1 - alpha) * prob**gamma * (1 - target) + alpha * target * (1 - prob) ** gamma
    loss = F.binary_cross_entropy_with_logits(scores, target, reduction="none") * weight
    num_pos = ((target > 0) & valid).sum().clamp(min=1)
    return torch.where(valid, loss, 0.0).sum() / num_pos
