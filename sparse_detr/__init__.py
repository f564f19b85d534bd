"""Sparse DETR as a detectron2 project.

Importing this package registers the `SparseDETR` meta-architecture and the backbones in detectron2's registries.
"""
from . import modeling
from .config import add_sparse_detr_config

__version__ = "0.1.0"
