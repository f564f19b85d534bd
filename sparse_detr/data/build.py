"""Data loaders of the trainer, with datasets checked before anything trains.

detectron2 reports a missing image directory at the first image read (mid-training), and a dataset that is only
evaluated at the end of a run is only loaded then; :func:`load_dataset_dicts` turns each such problem into an error
that names the dataset and the file, raised when the loaders are built.
"""
import difflib
import os
from typing import Any, Dict, List, Sequence

from torch.utils.data import DataLoader

from detectron2.config import CfgNode
from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.data.build import filter_images_with_only_crowd_annotations, print_instances_class_histogram

from .dataset_mapper import DetrDatasetMapper
from .image_cache import attach_image_bytes

__all__ = ["load_dataset_dicts", "build_detr_train_loader", "build_detr_test_loader"]


def _check_registered(name: str) -> None:
    if name in DatasetCatalog:
        return
    close = difflib.get_close_matches(name, DatasetCatalog.keys(), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(
        f"Dataset '{name}' is not registered in detectron2's DatasetCatalog.{hint} Register it first, e.g. with "
        f"detectron2.data.datasets.register_coco_instances(name, {{}}, json_file, image_root)."
    )


def load_dataset_dicts(names: Sequence[str], filter_empty: bool = False) -> List[Dict[str, Any]]:
    """:func:`detectron2.data.get_detection_dataset_dicts` (without proposals and keypoints) that fails clearly.

    Raises:
        KeyError: a name is not registered.
        RuntimeError: a dataset's loader failed (e.g. missing or malformed annotation file).
        FileNotFoundError: the image directory or an image file of a dataset does not exist.
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


def build_detr_train_loader(cfg: CfgNode) -> DataLoader:
    """detectron2's infinite training loader over ``DATASETS.TRAIN`` with :class:`DetrDatasetMapper`."""
    dicts = load_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    if cfg.DATALOADER.CACHE_IMAGES:
        attach_image_bytes(dicts)
    return build_detection_train_loader(cfg, mapper=DetrDatasetMapper(cfg, is_train=True), dataset=dicts)


def build_detr_test_loader(cfg: CfgNode, dataset_name: str) -> DataLoader:
    """detectron2's inference loader (one image per batch, split over processes) with :class:`DetrDatasetMapper`.

    ``DATALOADER.CACHE_IMAGES`` is not applied: the loader is rebuilt for every evaluation, which reads each
    image once anyway.
    """
    dicts = load_dataset_dicts([dataset_name])
    return build_detection_test_loader(
        dicts, mapper=DetrDatasetMapper(cfg, is_train=False), num_workers=cfg.DATALOADER.NUM_WORKERS
    )
