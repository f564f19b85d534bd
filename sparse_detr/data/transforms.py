"""The DETR training augmentation, written with detectron2's transforms.

Boxes are transformed by the same :class:`~detectron2.data.transforms.Transform` objects as the image
(``transforms.apply_box`` in :func:`detectron2.data.detection_utils.transform_instance_annotations`), so the
image and its annotations cannot drift apart.
"""
from typing import List, Sequence

from detectron2.config import CfgNode
from detectron2.data import transforms as T

__all__ = ["RandomSelect", "build_detr_augmentation"]


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


def build_detr_augmentation(cfg: CfgNode, is_train: bool) -> List[T.Augmentation]:
    """The reference's ``make_coco_transforms`` from a config.

    Training: random flip, then with probability 1/2 the multi-scale resize (``INPUT.MIN_SIZE_TRAIN``, longer side
    <= ``INPUT.MAX_SIZE_TRAIN``), otherwise resize the shorter side to one of ``INPUT.CROP.MIN_SIZE_BEFORE_CROP``,
    crop (``INPUT.CROP.TYPE``/``SIZE``, the reference's ``RandomSizeCrop(384, 600)`` is ``"absolute_range"``) and
    the same multi-scale resize. Without ``INPUT.CROP.ENABLED`` only the first branch is used.
    Test: resize the shorter side to ``INPUT.MIN_SIZE_TEST``, longer side <= ``INPUT.MAX_SIZE_TEST``.
    """
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, sample_style="choice")]

    augs: List[T.Augmentation] = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal", vertical=cfg.INPUT.RANDOM_FLIP == "vertical"
            )
        )

    def multi_scale_resize() -> T.Augmentation:
        return T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, sample_style=cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )

    if not cfg.INPUT.CROP.ENABLED:
        return augs + [multi_scale_resize()]
    crop_branch = [
        # No bound on the longer side here, as the reference's RandomResize([400, 500, 600]).
        T.ResizeShortestEdge(cfg.INPUT.CROP.MIN_SIZE_BEFORE_CROP, sample_style="choice"),
        T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
        multi_scale_resize(),
    ]
    return augs + [RandomSelect([multi_scale_resize()], crop_branch, prob=0.5)]
