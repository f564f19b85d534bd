"""Sparse DETR as a detectron2 project.

Importing this package registers the `SparseDETR` meta-architecture and the backbones in detectron2's registries,
and the synthetic datasets in its catalogs.
"""

from . import data, modeling  # data: registers the synthetic datasets (their class names, for every tool)
from .config import add_sparse_detr_config, setup_cfg

__version__ = "0.1.0"

__all__ = [
    "add_sparse_detr_config",
    "data",
    "modeling",
    "setup_cfg",
]
