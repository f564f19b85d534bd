"""Data pipeline: the DETR dataset mapper and augmentation, the image cache, the synthetic datasets."""

from . import datasets  # registers the synthetic splits in detectron2's catalogs
from .dataset_mapper import DetrDatasetMapper
from .image_cache import attach_image_bytes
from .transforms import RandomSelect, build_detr_augmentation

__all__ = [
    "DetrDatasetMapper",
    "RandomSelect",
    "attach_image_bytes",
    "build_detr_augmentation",
    "datasets",
]
