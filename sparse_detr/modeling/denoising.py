"""DINO's contrastive denoising (CDN) training queries: noised copies of the ground truth the decoder learns to
reconstruct (positives) or to reject (negatives), beside the matching queries.

Source: DINO (Zhang et al., ICLR 2023, Sec. 3.3 "Contrastive DeNoising Training"); the behaviour is that of
IDEA-Research/DINO `models/dino/dn_components.py` (`prepare_for_cdn`) and of the DN loss in `models/dino/dino.py`
(`SetCriterion.forward`), with detrex's `projects/dino/modeling/dino.py` group count (facts read, nothing copied).

Layout of the Q_dn = G * 2 * T_max denoising queries of every image (T_max: the most targets of an image in the
batch, G: the number of groups): group g holds positives at [g * 2 T_max, g * 2 T_max + T_max) and negatives at
[g * 2 T_max + T_max, (g + 1) * 2 T_max); the j-th slot of each half is target j of the image, and slots j >= T_i
of an image with T_i targets are padding. The decoder gets the Q_dn denoising queries first, then the Q matching
queries.
"""

from dataclasses import dataclass
from typing import List, NamedTuple, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from ..layers.box_ops import inverse_sigmoid
from .structures import Target

__all__ = [
    "DenoisingInput",
    "DenoisingQueries",
    "DenoisingSettings",
    "build_denoising_queries",
    "denoising_match_indices",
]

# DINO's inverse_sigmoid eps (util/misc.py), with which it turns the noised boxes into the decoder's references
DINO_LOGIT_EPS = 1e-3


@dataclass(frozen=True)
class DenoisingSettings:
    """How a model draws its denoising queries (MODEL.SPARSE_DETR.DN): the arguments of
    :func:`build_denoising_queries` that do not change between batches."""

    number: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0

    def __post_init__(self):
        # checked once here, with the config keys named, rather than at the first training step
        for key, ok, rule in (
            ("NUMBER", self.number >= 1, ">= 1"),
            ("LABEL_NOISE_RATIO", 0.0 <= self.label_noise_ratio <= 1.0, "in [0, 1]"),
            ("BOX_NOISE_SCALE", self.box_noise_scale >= 0, ">= 0"),
        ):
            if not ok:
                raise ValueError(f"MODEL.SPARSE_DETR.DN.{key} must be {rule}, got {getattr(self, key.lower())}")


class DenoisingInput(NamedTuple):
    """Denoising queries as the decoder takes them, in front of its Q matching queries.

    content: [N, Q_dn, C] the embeddings of the noised labels; zero on padding (DINO's zero vector).
    references: [N, Q_dn, 4] the noised boxes as reference boxes, normalized cxcywh strictly inside (0, 1): DINO's
        logit form (:meth:`DenoisingQueries.unactivated_boxes`) back through the sigmoid, so a zero width becomes a
        small positive one.
    self_attn_mask: [Q_dn + Q, Q_dn + Q] bool, True = blocked (:attr:`DenoisingQueries.attn_mask`). With fewer
        matching queries than Q (an image of fewer tokens), its top-left square is the mask for them: the matching
        queries come last and are all alike.
    """

    content: Tensor
    references: Tensor
    self_attn_mask: Tensor


@dataclass
class DenoisingQueries:
    """The denoising queries of a batch.

    Attributes:
        labels: [N, Q_dn] long, the noised class ids the label queries embed; `num_classes` on padding. (DINO
            feeds a zero vector at padding, not an embedding: mask the embedding with `valid`.)
        boxes: [N, Q_dn, 4] the noised boxes, normalized cxcywh in [0, 1] (sigmoid space, where DINO's noise is
            drawn); padding holds 0.5 everywhere, the sigmoid of DINO's zero padding. The decoder takes them in
            logit form: :meth:`unactivated_boxes`.
        attn_mask: [Q_dn + Q, Q_dn + Q] bool, True = blocked, for the decoder's self-attention (rows attend,
            columns are attended): matching queries see no denoising query, a group sees no other group, a group's
            queries see each other (padding included, as DINO) and every matching query.
        valid: [N, Q_dn] bool, True on the queries that stand for a target (positive or negative), False on
            padding.
        num_groups: G; 0 when no image has a target (then Q_dn = 0).
        max_targets: T_max.
        num_targets: T_i of every image.
    """

    labels: Tensor
    boxes: Tensor
    attn_mask: Tensor
    valid: Tensor
    num_groups: int
    max_targets: int
    num_targets: List[int]

    @property
    def num_queries(self) -> int:
        """Q_dn, the denoising queries per image."""
        return self.num_groups * 2 * self.max_targets

    def positive_mask(self) -> Tensor:
        """[Q_dn] bool, True on the positive halves of the groups (padding included)."""
        slot = torch.arange(self.num_queries, device=self.labels.device) % (2 * self.max_targets)
        return slot < self.max_targets

    def unactivated_boxes(self, eps: float = DINO_LOGIT_EPS) -> Tensor:
        """[N, Q_dn, 4] the boxes in logit form, as DINO feeds them to the decoder (padding: 0)."""
        return inverse_sigmoid(self.boxes, eps=eps)

    def split(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """x: [N, Q_dn + Q, ...], the decoder's output on all queries -> ([N, Q_dn, ...], [N, Q, ...])."""
        return x[:, : self.num_queries], x[:, self.num_queries :]

    def decoder_input(self, label_embed: nn.Embedding) -> DenoisingInput:
        """The queries for the decoder, their content embedded by `label_embed` (num_classes rows: the padding
        label num_classes is never looked up; its queries get a zero vector)."""
        labels = self.labels.masked_fill(~self.valid, 0)
        content = label_embed(labels) * self.valid[..., None].to(label_embed.weight.dtype)
        return DenoisingInput(content, self.unactivated_boxes().sigmoid(), self.attn_mask)


def _check_arguments(
    num_classes: int, dn_number: int, label_noise_ratio: float, box_noise_scale: float, num_matching_queries: int
) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if dn_number < 1:
        raise ValueError(f"dn_number must be >= 1 (without denoising, build no denoising queries), got {dn_number}")
    if not 0.0 <= label_noise_ratio <= 1.0:
        raise ValueError(f"label_noise_ratio must be in [0, 1], got {label_noise_ratio}")
    if box_noise_scale < 0:
        raise ValueError(f"box_noise_scale must be >= 0, got {box_noise_scale}")
    if num_matching_queries < 1:
        raise ValueError(f"num_matching_queries must be >= 1, got {num_matching_queries}")


def _attention_mask(num_groups: int, group_size: int, num_matching_queries: int, device: torch.device) -> Tensor:
    """[Q_dn + Q, Q_dn + Q] bool, True = blocked (see :class:`DenoisingQueries`)."""
    num_dn = num_groups * group_size
    mask = torch.zeros(num_dn + num_matching_queries, num_dn + num_matching_queries, dtype=torch.bool, device=device)
    mask[num_dn:, :num_dn] = True
    group = torch.arange(num_dn, device=device) // max(group_size, 1)
    mask[:num_dn, :num_dn] = group[:, None] != group[None, :]
    return mask


def build_denoising_queries(
    targets: List[Target],
    num_classes: int,
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    num_matching_queries: int,
    generator: torch.Generator,
) -> DenoisingQueries:
    """DINO's contrastive denoising queries of a batch.

    Groups: G = max(1, dn_number // T_max), so G * T_max <= dn_number positives (and as many negatives) per image,
    unless one image alone has more than dn_number targets; no group when no image has a target. (detrex's rule;
    DINO's own code agrees for dn_number >= 50 and, below, makes 2 * dn_number groups whatever T_max.)

    Label noise: each query's label is, with probability label_noise_ratio / 2, replaced by a class drawn
    uniformly from all num_classes (possibly the same one), as DINO ("half of bbox prob").

    Box noise, in normalized xyxy: each corner coordinate moves by s * u * box_noise_scale * (half the box width
    for x, half the height for y), s = +-1 with equal odds, u ~ U[0, 1) for positives and U[1, 2) for negatives;
    then the corners are clamped to [0, 1] and turned back into cxcywh. So, before the clamp, a positive corner
    moves by less than lambda = box_noise_scale half-sizes, a negative one by [lambda, 2 lambda). Negative widths
    (a negative's corners may cross) are stored as 0, which is what DINO's inverse_sigmoid makes of them.
    box_noise_scale = 0 (or label_noise_ratio = 0) draws no box (label) noise, as DINO.

    All randomness comes from `generator`, drawn on its device (a CPU generator gives the same queries on any
    device, for exact resume); the global RNG is left untouched.

    Args:
        targets: per image; boxes normalized cxcywh.
        num_classes: classes of the label noise (labels are in [0, num_classes)).
        dn_number: DINO's `dn_number`: the budget of positive denoising queries per image (DINO 4-scale: 100);
            the negatives double it.
        label_noise_ratio: DINO's `dn_label_noise_ratio` (0.5).
        box_noise_scale: DINO's `dn_box_noise_scale`, lambda (1.0 in DINO's training scripts and detrex).
        num_matching_queries: Q, the decoder's other queries (for the attention mask).
        generator: the source of all noise.
    """
    _check_arguments(num_classes, dn_number, label_noise_ratio, box_noise_scale, num_matching_queries)
    if not targets:
        raise ValueError("targets: the batch has no image")
    num_targets = [len(t.labels) for t in targets]
    for i, t in enumerate(targets):
        if t.labels.dim() != 1 or t.boxes.shape != (num_targets[i], 4):
            raise ValueError(
                f"targets[{i}]: labels must be [T] and boxes [T, 4], got {tuple(t.labels.shape)} and "
                f"{tuple(t.boxes.shape)}"
            )
    device = targets[0].boxes.device
    n = len(targets)
    t_max = max(num_targets)
    num_groups = max(1, dn_number // t_max) if t_max > 0 else 0

    # [N, T_max] gt (labels padded with num_classes, boxes with 0.5), then [N, G, 2, T_max] copies
    labels = torch.full((n, t_max), num_classes, dtype=torch.long, device=device)
    boxes = torch.full((n, t_max, 4), 0.5, device=device)
    for i, t in enumerate(targets):
        labels[i, : num_targets[i]] = t.labels
        boxes[i, : num_targets[i]] = t.boxes.to(device, boxes.dtype)
    slot_valid = torch.arange(t_max, device=device)[None] < torch.tensor(num_targets, device=device)[:, None]
    shape = (n, num_groups, 2, t_max)
    labels = labels[:, None, None].expand(shape).clone()
    boxes = boxes[:, None, None].expand(*shape, 4).clone()
    valid = slot_valid[:, None, None].expand(shape)

    def draw(fn, *args, size):
        return fn(*args, size=size, generator=generator, device=generator.device).to(device)

    if label_noise_ratio > 0:
        resample = draw(torch.rand, size=shape) < label_noise_ratio * 0.5
        new_labels = draw(torch.randint, 0, num_classes, size=shape)
        labels = torch.where(resample & valid, new_labels, labels)

    if box_noise_scale > 0:
        sign = draw(torch.randint, 0, 2, size=(*shape, 4)).to(boxes.dtype) * 2 - 1
        magnitude = draw(torch.rand, size=(*shape, 4)).to(boxes.dtype)
        magnitude[:, :, 1] += 1  # the negative halves
        half_size = boxes[..., 2:].repeat(1, 1, 1, 1, 2) / 2
        xyxy = box_convert(boxes, "cxcywh", "xyxy") + sign * magnitude * half_size * box_noise_scale
        noised = box_convert(xyxy.clamp(0.0, 1.0), "xyxy", "cxcywh")
        noised[..., 2:] = noised[..., 2:].clamp(min=0.0)
        boxes = torch.where(valid[..., None], noised, boxes)

    group_size = 2 * t_max
    return DenoisingQueries(
        labels=labels.reshape(n, -1),
        boxes=boxes.reshape(n, -1, 4),
        attn_mask=_attention_mask(num_groups, group_size, num_matching_queries, device),
        valid=valid.reshape(n, -1),
        num_groups=num_groups,
        max_targets=t_max,
        num_targets=num_targets,
    )


def denoising_match_indices(dq: DenoisingQueries) -> List[Tuple[Tensor, Tensor]]:
    """The fixed assignment of the positive denoising queries to their targets, in the matcher's form.

    Per image (query indices into its Q_dn denoising queries, target indices), int64 on the CPU as
    `HungarianMatcher` returns them, G * T_i pairs, group by group: query g * 2 T_max + j is matched to target j.
    With it, the set losses (focal, L1, GIoU) run on the denoising outputs without the matcher: the negatives and
    the padding are unmatched, so the class loss trains them as "no object" (all-zero target) and the box losses
    skip them, as DINO. DINO divides these losses by num_boxes * G (its `num_boxes * scalar`).
    """
    offsets = torch.arange(dq.num_groups)[:, None] * (2 * dq.max_targets)
    indices = []
    for t in dq.num_targets:
        tgt = torch.arange(t)
        indices.append(((offsets + tgt).flatten(), tgt.repeat(dq.num_groups)))
    return indices
