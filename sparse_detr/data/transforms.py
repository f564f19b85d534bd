"""The DETR training augmentation, written with detectron2's transforms.

Boxes are transformed by the same :class:`~detectron2.data.transforms.Transform` objects as the image
(``transforms.apply_box`` in :func:`detectron2.data.detection_utils.transform_instance_annotations`), so the
image and its annotations cannot drift apart.
"""

import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T

__all__ = [
    "RESIZE_ROUNDINGS",
    "RandomSelect",
    "ReferenceResizeShortestEdge",
    "build_detr_augmentation",
    "build_test_resize",
]

# INPUT.RESIZE_ROUNDING: detectron2's ResizeShortestEdge, or the reference's size arithmetic
RESIZE_ROUNDINGS = ("detectron2", "reference")


class RandomSelect(T.Augmentation):
    """Apply one of two augmentation sequences: ``first`` with probability ``prob``, otherwise ``second``.

    Either sequence may depend on the outcome of its earlier steps (a crop drawn from the resized image), which a
    single :meth:`get_transform` cannot express; hence the override of ``__call__``, as in
    :class:`~detectron2.data.transforms.AugmentationList`.
    """

    def __init__(self, first: Sequence[T.Augmentation], second: Sequence[T.Augmentation], prob: float = 0.5):
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.first = T.AugmentationList(list(first))
        self.second = T.AugmentationList(list(second))
        self.prob = prob

    def __call__(self, aug_input: T.AugInput) -> T.Transform:
        chosen = self.first if self._rand_range() < self.prob else self.second
        return chosen(aug_input)

    def __repr__(self) -> str:
        return f"RandomSelect(p={self.prob}: {self.first} | {self.second})"

    __str__ = __repr__


class ReferenceResizeShortestEdge(T.Augmentation):
    """Resize the shorter side to one of `short_edge_length` (chosen at random) with the longer side at most
    `max_size`, in the reference's arithmetic (DETR's `get_size_with_aspect_ratio`, which kakaobrain/sparse-detr
    keeps), so that converted checkpoints see the reference's pixels:

    - the target short side is `size`, or round(max_size * short / long) when the long side would exceed max_size;
    - the long side is then floored: int(size * long / short); an image whose short side already is `size` stays.

    detectron2's `ResizeShortestEdge` rounds the long side instead: a 600x512 (h x w) photo becomes 937x800 here,
    938x800 there. Both resize with PIL's bilinear filter.
    """

    def __init__(self, short_edge_length: Sequence[int], max_size: Optional[int] = None):
        super().__init__()
        self.short_edge_length = list(short_edge_length)
        self.max_size = max_size

    @staticmethod
    def get_output_shape(height: int, width: int, size: int, max_size: Optional[int]) -> Tuple[int, int]:
        """(new height, new width) of a height x width image."""
        short, long = min(height, width), max(height, width)
        if max_size is not None and long / short * size > max_size:
            size = int(round(max_size * short / long))
        if short == size:
            return height, width
        if width < height:
            return int(size * height / width), size
        return size, int(size * width / height)

    def get_transform(self, image: np.ndarray) -> T.Transform:
        height, width = image.shape[:2]
        size = int(np.random.choice(self.short_edge_length))
        new_height, new_width = self.get_output_shape(height, width, size, self.max_size)
        if (new_height, new_width) == (height, width):
            return T.NoOpTransform()
        return T.ResizeTransform(height, width, new_height, new_width)


def _shortest_edge_resize(cfg: CfgNode, sizes: Sequence[int], max_size: Optional[int], sample_style: str):
    """The resize of INPUT.RESIZE_ROUNDING: detectron2's, or the reference's (which only picks from a list)."""
    rounding = cfg.INPUT.RESIZE_ROUNDING
    if rounding not in RESIZE_ROUNDINGS:
        raise ValueError(f"INPUT.RESIZE_ROUNDING must be one of {RESIZE_ROUNDINGS}, got {rounding!r}")
    if rounding == "detectron2":
        return T.ResizeShortestEdge(sizes, max_size if max_size is not None else sys.maxsize, sample_style)
    if sample_style != "choice":
        raise ValueError(
            f"INPUT.RESIZE_ROUNDING 'reference' picks sizes from a list: INPUT.MIN_SIZE_TRAIN_SAMPLING must be "
            f"'choice', got {sample_style!r}"
        )
    return ReferenceResizeShortestEdge([sizes] if isinstance(sizes, int) else sizes, max_size)


def build_test_resize(cfg: CfgNode) -> T.Augmentation:
    """The test-time resize: shorter side to ``INPUT.MIN_SIZE_TEST``, longer side <= ``INPUT.MAX_SIZE_TEST``,
    rounded as ``INPUT.RESIZE_ROUNDING`` says. Every inference path (evaluation, predictor, export) resizes with it."""
    return _shortest_edge_resize(cfg, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")


def test_input(resize: T.Augmentation, image: np.ndarray) -> torch.Tensor:
    """An image as the model's test input: [H, W, C] uint8 in the model's INPUT.FORMAT -> [C, H', W'] float32 pixels
    resized by ``resize`` (:func:`build_test_resize`), as the evaluation's mapper makes them."""
    resized = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(resized.astype("float32").transpose(2, 0, 1)))


def build_detr_augmentation(cfg: CfgNode, is_train: bool) -> List[T.Augmentation]:
    """The reference's ``make_coco_transforms`` from a config.

    Training: random flip, then with probability 1/2 the multi-scale resize (``INPUT.MIN_SIZE_TRAIN``, longer side
    <= ``INPUT.MAX_SIZE_TRAIN``), otherwise resize the shorter side to one of ``INPUT.CROP.MIN_SIZE_BEFORE_CROP``,
    crop (``INPUT.CROP.TYPE``/``SIZE``, the reference's ``RandomSizeCrop(384, 600)`` is ``"absolute_range"``) and
    the same multi-scale resize. Without ``INPUT.CROP.ENABLED`` only the first branch is used.
    Test: resize the shorter side to ``INPUT.MIN_SIZE_TEST``, longer side <= ``INPUT.MAX_SIZE_TEST``.
    Every resize rounds as ``INPUT.RESIZE_ROUNDING`` says (see :class:`ReferenceResizeShortestEdge`).
    """
    if not is_train:
        return [build_test_resize(cfg)]

    augs: List[T.Augmentation] = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal", vertical=cfg.INPUT.RANDOM_FLIP == "vertical")
        )

    def multi_scale_resize() -> T.Augmentation:
        return _shortest_edge_resize(
            cfg, cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )

    if not cfg.INPUT.CROP.ENABLED:
        return augs + [multi_scale_resize()]
    crop_branch = [
        # No bound on the longer side here, as the reference's RandomResize([400, 500, 600]).
        _shortest_edge_resize(cfg, cfg.INPUT.CROP.MIN_SIZE_BEFORE_CROP, None, "choice"),
        T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
        multi_scale_resize(),
    ]
    return augs + [RandomSelect([multi_scale_resize()], crop_branch, prob=0.5)]
