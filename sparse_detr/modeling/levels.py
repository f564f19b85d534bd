"""The multi-level token layout: feature levels flattened into one sequence, level after level, row-major."""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["FlatLevels", "size_min", "valid_sizes", "valid_ratio"]


def size_min(a, b):
    """The smaller of two sizes, whatever tracer made them: Python ints in eager mode, symbolic ints under
    torch.export (`torch.sym_min` keeps both cases in the graph, where `min` would fix one), 0-dim tensors under
    torch.jit.trace (fvcore's FLOP counter)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return min(a, b)
    return torch.sym_min(a, b)


def valid_sizes(mask: Tensor) -> Tensor:
    """mask: [N, H, W] bool, True on padding (bottom/right) -> [N, 2] long, the (height, width) of the image part."""
    return torch.stack([(~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)], -1)


def valid_ratio(mask: Tensor) -> Tensor:
    """mask: [N, H, W] bool, True on padding -> [N, 2] (w, h) share of the map covered by the image."""
    _, H, W = mask.shape
    sizes = valid_sizes(mask).float()
    return torch.stack([sizes[:, 1] / W, sizes[:, 0] / H], -1)


@dataclass
class FlatLevels:
    """Where each level sits in the flattened token sequence, and which tokens are padding.

    Attributes:
        shapes: (H_l, W_l) of each level, as Python ints.
        spatial_shapes: [L, 2] long, the same on the tokens' device (what the attention op takes).
        level_start_index: [L] long, offset of each level in the sequence.
        padding_mask: [N, S] bool, True on padded tokens; S = sum of H_l * W_l.
        valid_ratios: [N, L, 2] (w, h) share of each level covered by the image.
    """

    shapes: List[Tuple[int, int]]
    spatial_shapes: Tensor
    level_start_index: Tensor
    padding_mask: Tensor
    valid_ratios: Tensor

    @classmethod
    def from_masks(cls, masks: Sequence[Tensor]) -> "FlatLevels":
        """masks: per level [N, H_l, W_l] bool, True on padding."""
        shapes = [(m.shape[1], m.shape[2]) for m in masks]
        # torch.tensor, not torch.as_tensor: under torch.export the sizes stay symbolic
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=masks[0].device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        return cls(
            shapes=shapes,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            padding_mask=torch.cat([m.flatten(1) for m in masks], 1),
            valid_ratios=torch.stack([valid_ratio(m) for m in masks], 1),
        )

    @property
    def num_tokens(self) -> int:
        return sum(h * w for h, w in self.shapes)

    def split(self, x: Tensor) -> List[Tensor]:
        """x: [N, S, ...] -> per level [N, H_l * W_l, ...]."""
        return list(x.split([h * w for h, w in self.shapes], dim=1))

    def level_masks(self) -> List[Tensor]:
        """Per level [N, H_l, W_l] bool, True on padding."""
        return [m.view(-1, h, w) for m, (h, w) in zip(self.split(self.padding_mask), self.shapes)]
