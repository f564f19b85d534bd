"""Deployment of `SparseDETR`: torch.export (ExportedProgram, AOTInductor) and ONNX (onnxruntime, TensorRT).

Importing this package needs neither onnx nor onnxruntime: `sparse_detr.export.onnx` imports them when an ONNX
export runs, and says how to install them when they are missing.
"""

from .torch_export import coarsest_stride, example_image, export_program
from .verify import Detections, Parity, compare, eager_detections
from .wrapper import ExportableSparseDETR

__all__ = [
    "Detections",
    "ExportableSparseDETR",
    "Parity",
    "coarsest_stride",
    "compare",
    "eager_detections",
    "example_image",
    "export_program",
]
