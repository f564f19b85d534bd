from . import builtin as _builtin  # registers the synthetic splits
from .synthetic_shapes import (
    SHAPE_CLASSES,
    SyntheticShapesSpec,
    ensure_synthetic_shapes,
    register_synthetic_shapes,
    render_synthetic_image,
)
