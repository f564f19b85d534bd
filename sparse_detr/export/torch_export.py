"""torch.export of :class:`ExportableSparseDETR`: an ExportedProgram with dynamic image height and width that keeps
the compiled op `sparse_detr::ms_deform_attn` as one node."""

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.export import Dim, ExportedProgram

from ..modeling.meta_arch import SparseDETR
from .wrapper import ExportableSparseDETR

__all__ = ["coarsest_stride", "example_image", "export_program", "package_aoti"]


def coarsest_stride(model: SparseDETR) -> int:
    """Stride of the model's coarsest transformer level: the last backbone feature's, doubled by every extra level."""
    shapes = model.backbone.output_shape()
    stride = shapes[model.in_features[-1]].stride
    return stride * 2 ** (model.transformer.num_feature_levels - len(model.in_features))


def example_image(model: SparseDETR, size: Optional[Tuple[int, int]] = None, seed: int = 0) -> Tensor:
    """A random [3, H, W] image in 0..255 to trace with; by default 3 x 4 coarsest strides (e.g. 192 x 256 for
    ResNet features at strides 8..64), small and of distinct sides (a side equal to another size of the graph
    could be taken for the same symbol)."""
    stride = coarsest_stride(model)
    height, width = size if size is not None else (3 * stride, 4 * stride)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, height, width, generator=g) * 255


def export_program(model: SparseDETR, image: Optional[Tensor] = None) -> ExportedProgram:
    """The inference of `model` on one image as an ExportedProgram.

    Height and width are dynamic, from just over the coarsest level's stride up: every level then has at least
    two rows and columns (a size-1 level would be specialized to 1 by the tracer). Sparse DETR's number of kept
    tokens is a data-dependent size of the graph, computed from the image size as in eager mode.

    Args:
        model: a `SparseDETR`, exported as prepared for inference (see :class:`ExportableSparseDETR`).
        image: [3, H, W] example to trace with (e.g. a real test image); default :func:`example_image`.
    """
    wrapper = ExportableSparseDETR(model)
    if image is None:
        image = example_image(model)
    min_size = coarsest_stride(model) + 1
    if image.dim() != 3 or min(image.shape[1:]) < min_size:
        raise ValueError(
            f"image: the example must be [3, H, W] with H, W >= {min_size} (one pixel over the coarsest stride), "
            f"got shape {tuple(image.shape)}"
        )
    dims = {1: Dim("height", min=min_size), 2: Dim("width", min=min_size)}
    with torch.no_grad():
        return torch.export.export(wrapper, (image.to(model.device),), dynamic_shapes={"image": dims})


def package_aoti(program: ExportedProgram, path: str) -> str:
    """Compile `program` ahead of time with AOTInductor (C++ and a shared library, the host's compiler) into a
    `.pt2` package at `path`; load it with `torch._inductor.aoti_load_package` after `import sparse_detr` (the
    package calls the compiled op `sparse_detr::ms_deform_attn` through PyTorch's dispatcher, so the op must be
    registered in the process). Compiling takes minutes."""
    return torch._inductor.aoti_compile_and_package(program, package_path=path)
