from . import builtin as _builtin  # registers the synthetic splits
from .coco_format import register_coco_instances_from_config
from .synthetic_shapes import (
    SHAPE_CLASSES,
    SyntheticShapesSpec,
    ensure_synthetic_shapes,
    register_synthetic_shapes,
    render_synthetic_image,
)
