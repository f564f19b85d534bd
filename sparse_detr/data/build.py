"""Data loaders of the trainer, with datasets checked before anything trains.

detectron2 reports a missing image directory at the first image read (mid-training), and a dataset that is only
evaluated at the end of a run is only loaded then; :func:`load_dataset_dicts` turns each such problem into an error
that names the dataset and the file, raised when the loaders are built.
"""

import difflib
import logging
import os
from functools import partial
from typing import Any, Dict, List, Optional, Sequence

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.data.build import filter_images_with_only_crowd_annotations, print_instances_class_histogram
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from detectron2.utils import comm
from torch.utils.data import DataLoader

from .dataset_mapper import DetrDatasetMapper
from .image_cache import attach_image_bytes, undecodable_images
from .stream import TrainStream

__all__ = ["load_dataset_dicts", "build_detr_train_loader", "build_detr_test_loader"]

logger = logging.getLogger(__name__)


def _check_registered(name: str) -> None:
    if name in DatasetCatalog:
        return
    close = difflib.get_close_matches(name, DatasetCatalog.keys(), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(
        f"Dataset '{name}' is not registered in detectron2's DatasetCatalog.{hint} Register it first, e.g. with "
        f"detectron2.data.datasets.register_coco_instances(name, {{}}, json_file, image_root)."
    )


def load_dataset_dicts(
    names: Sequence[str],
    filter_empty: bool = False,
    *,
    num_classes: Optional[int] = None,
    check_images: bool = False,
) -> List[Dict[str, Any]]:
    """:func:`detectron2.data.get_detection_dataset_dicts` (without proposals and keypoints) that fails clearly.

    Args:
        names: registered dataset names.
        filter_empty: drop images without (non-crowd) annotations.
        num_classes: the model's classes (``MODEL.SPARSE_DETR.NUM_CLASSES``), when the datasets are to be trained or
            evaluated on: every annotation's ``category_id`` must be below it, and a dataset that names its
            categories (``thing_classes``) must have exactly that many.
        check_images: decode every image first (``DATALOADER.CHECK_IMAGES``).

    Raises:
        KeyError: a name is not registered.
        RuntimeError: a dataset's loader failed (e.g. missing or malformed annotation file).
        FileNotFoundError: the image directory or an image file of a dataset does not exist.
        ValueError: class ids or the number of categories do not fit ``num_classes``.
        OSError: with ``check_images``, images that cannot be decoded, named.
    """
    if isinstance(names, str) or len(names) == 0:
        raise ValueError(f"names must be a non-empty list of dataset names, got {names!r}")
    for name in names:
        _check_registered(name)
    all_dicts: List[Dict[str, Any]] = []
    for name in names:
        meta = MetadataCatalog.get(name)
        where = f" (annotations: {meta.json_file})" if hasattr(meta, "json_file") else ""
        try:
            dicts = DatasetCatalog.get(name)
        except Exception as e:
            raise RuntimeError(f"Could not load dataset '{name}'{where}: {type(e).__name__}: {e}") from e
        if len(dicts) == 0:
            raise RuntimeError(f"Dataset '{name}'{where} has no images")
        image_root = getattr(meta, "image_root", None)
        if image_root is not None and not os.path.isdir(image_root):
            raise FileNotFoundError(f"Image directory of dataset '{name}' does not exist: {image_root}")
        missing = [d["file_name"] for d in dicts if not os.path.isfile(d["file_name"])]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(dicts)} images of dataset '{name}' do not exist, e.g. {missing[0]}"
            )
        if num_classes is not None:
            _check_classes(name, dicts, num_classes)
        if check_images:
            _check_images(name, dicts)
        all_dicts.extend(dicts)

    if "annotations" in all_dicts[0]:
        if filter_empty:
            all_dicts = filter_images_with_only_crowd_annotations(all_dicts)
        classes = [getattr(MetadataCatalog.get(n), "thing_classes", None) for n in names]
        if any(c != classes[0] for c in classes):
            raise ValueError(f"Datasets {list(names)} have different thing_classes: {classes}")
        if classes[0] is not None:
            print_instances_class_histogram(all_dicts, classes[0])
    return all_dicts


def _check_classes(name: str, dicts: List[Dict[str, Any]], num_classes: int) -> None:
    classes = getattr(MetadataCatalog.get(name), "thing_classes", None)
    for d in dicts:
        for anno in d.get("annotations", ()):
            c = anno["category_id"]
            if not 0 <= c < num_classes:
                known = f" ('{classes[c]}' of {len(classes)} categories)" if classes and 0 <= c < len(classes) else ""
                raise ValueError(
                    f"Dataset '{name}' has class id {c}{known} in {d['file_name']}, outside the model's "
                    f"MODEL.SPARSE_DETR.NUM_CLASSES = {num_classes} classes (ids 0..{num_classes - 1})"
                )
    if classes is not None and len(classes) != num_classes:
        shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
        raise ValueError(
            f"MODEL.SPARSE_DETR.NUM_CLASSES is {num_classes} but dataset '{name}' has {len(classes)} categories "
            f"({shown}); set MODEL.SPARSE_DETR.NUM_CLASSES {len(classes)}"
        )


def _check_images(name: str, dicts: List[Dict[str, Any]]) -> None:
    logger.info(f"Decoding the {len(dicts)} images of dataset '{name}' (DATALOADER.CHECK_IMAGES) ...")
    failed = undecodable_images([d["file_name"] for d in dicts])
    if failed:
        shown = "; ".join(failed[:5]) + ("; ..." if len(failed) > 5 else "")
        raise OSError(f"{len(failed)} of {len(dicts)} images of dataset '{name}' cannot be decoded: {shown}")


def build_detr_train_loader(cfg: CfgNode) -> TrainStream:
    """The training batches of ``DATASETS.TRAIN`` through :class:`DetrDatasetMapper`: a :class:`TrainStream`, which
    checkpoints resume exactly, with detectron2's ``DATALOADER.SAMPLER_TRAIN`` ``TrainingSampler`` or
    ``RepeatFactorTrainingSampler``, seeded with ``SEED`` (a random seed shared by all processes if negative).
    """
    dicts = load_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        num_classes=cfg.MODEL.SPARSE_DETR.NUM_CLASSES,
        check_images=cfg.DATALOADER.CHECK_IMAGES,
    )
    if cfg.DATALOADER.CACHE_IMAGES:
        attach_image_bytes(dicts)
    D = cfg.DATALOADER
    if D.SAMPLER_TRAIN == "TrainingSampler":
        make_sampler = partial(TrainingSampler, len(dicts))
    elif D.SAMPLER_TRAIN == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dicts, D.REPEAT_THRESHOLD, sqrt=D.REPEAT_SQRT
        )
        make_sampler = partial(RepeatFactorTrainingSampler, factors)
    else:
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN must be 'TrainingSampler' or 'RepeatFactorTrainingSampler' (the samplers "
            f"whose stream a checkpoint can resume), got {D.SAMPLER_TRAIN!r}"
        )
    total, world = cfg.SOLVER.IMS_PER_BATCH, comm.get_world_size()
    if total % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH ({total}) must be a multiple of the number of processes ({world})")
    return TrainStream(
        dicts,
        DetrDatasetMapper(cfg, is_train=True),
        make_sampler,
        total // world,
        cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed(),
        num_workers=D.NUM_WORKERS,
        aspect_ratio_grouping=D.ASPECT_RATIO_GROUPING,
    )


def build_detr_test_loader(cfg: CfgNode, dataset_name: str) -> DataLoader:
    """detectron2's inference loader (one image per batch, split over processes) with :class:`DetrDatasetMapper`.

    ``DATALOADER.CACHE_IMAGES`` is not applied: the loader is rebuilt for every evaluation, which reads each
    image once anyway.
    """
    dicts = load_dataset_dicts([dataset_name])
    return build_detection_test_loader(
        dicts, mapper=DetrDatasetMapper(cfg, is_train=False), num_workers=cfg.DATALOADER.NUM_WORKERS
    )
