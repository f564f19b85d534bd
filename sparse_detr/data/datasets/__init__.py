from . import builtin  # noqa: F401  (imported to register the synthetic splits)
from .coco_format import dataset_metadata, register_coco_instances_from_config
from .synthetic_shapes import (
    SHAPE_CLASSES,
    SyntheticShapesSpec,
    ensure_synthetic_shapes,
    register_synthetic_shapes,
    render_synthetic_image,
)

__all__ = [
    "SHAPE_CLASSES",
    "SyntheticShapesSpec",
    "dataset_metadata",
    "ensure_synthetic_shapes",
    "register_coco_instances_from_config",
    "register_synthetic_shapes",
    "render_synthetic_image",
]
