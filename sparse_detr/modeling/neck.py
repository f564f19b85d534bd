"""The neck between the backbone and the transformer: every transformer level's projected map, padding mask and
position embedding."""

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from ..layers.position_encoding import mask_sine_embedding

__all__ = ["MultiLevelNeck", "check_in_features"]


def check_in_features(in_features: Sequence[str], output_shape: Dict[str, ShapeSpec]) -> None:
    """Raises ValueError unless `in_features` is a non-empty list of maps the backbone (`output_shape`) produces."""
    missing = [f for f in in_features if f not in output_shape]
    if not in_features or missing:
        raise ValueError(
            f"in_features (MODEL.SPARSE_DETR.IN_FEATURES) {list(in_features)}: the backbone does not produce "
            f"{missing or 'an empty list'}; it produces {sorted(output_shape)}"
        )


class MultiLevelNeck(nn.ModuleList):
    """The backbone maps -> ``num_levels`` maps of ``hidden_dim`` channels, with their masks and sine position
    embeddings.

    Each backbone map goes through a 1x1 conv + GroupNorm(32); the further levels come from stride-2 3x3 convs +
    GroupNorm, the first on the last backbone map itself, the next ones on the previous level.

    It is a ``ModuleList`` of those projections (one ``Sequential(conv, norm)`` per level) so that, registered as the
    model's ``input_proj``, its parameters keep the names released checkpoints pin: ``input_proj.{level}.0.*``
    (conv) and ``input_proj.{level}.1.*`` (norm). The position embedding holds no state.

    Args:
        in_channels: channels of each backbone map fed in, finest first.
        hidden_dim: channels of the transformer, a multiple of 32 (GroupNorm(32)).
        num_levels: the transformer's levels, >= len(in_channels).
    """

    @configurable
    def __init__(self, *, in_channels: Sequence[int], hidden_dim: int, num_levels: int):
        if num_levels < len(in_channels):
            raise ValueError(
                f"num_levels (MODEL.SPARSE_DETR.NUM_FEATURE_LEVELS, {num_levels}) must be >= the number of backbone "
                f"maps fed in (MODEL.SPARSE_DETR.IN_FEATURES, {len(in_channels)})"
            )
        if hidden_dim % 32 != 0:
            raise ValueError(
                f"hidden_dim (MODEL.SPARSE_DETR.HIDDEN_DIM, {hidden_dim}) must be divisible by 32 (GroupNorm(32) in "
                "the input projections)"
            )
        projections = [
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim)) for c in in_channels
        ]
        extra_in = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            conv = nn.Conv2d(extra_in, hidden_dim, kernel_size=3, stride=2, padding=1)
            projections.append(nn.Sequential(conv, nn.GroupNorm(32, hidden_dim)))
            extra_in = hidden_dim
        super().__init__(projections)
        for proj in self:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.num_inputs = len(in_channels)
        self.hidden_dim = hidden_dim

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        S = cfg.MODEL.SPARSE_DETR
        check_in_features(S.IN_FEATURES, input_shape)
        return {
            "in_channels": [input_shape[f].channels for f in S.IN_FEATURES],
            "hidden_dim": S.HIDDEN_DIM,
            "num_levels": S.NUM_FEATURE_LEVELS,
        }

    @property
    def num_levels(self) -> int:
        return len(self)

    def forward(self, maps: Sequence[Tensor], padding_mask: Tensor) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """
        Args:
            maps: the backbone's maps fed in, finest first, [N, C_i, H_i, W_i].
            padding_mask: [N, H, W] bool, True on the pixels that padding added to the input images.
        Returns:
            srcs: per level [N, hidden_dim, H_l, W_l];
            masks: per level [N, H_l, W_l] bool, the padding mask resized (nearest) to the level;
            pos: per level [N, hidden_dim, H_l, W_l] sine position embeddings, in the maps' dtype.
        """
        if len(maps) != self.num_inputs:
            raise ValueError(f"maps: the neck takes {self.num_inputs} backbone maps, got {len(maps)}")
        srcs = [proj(x) for proj, x in zip(self, maps)]
        last = maps[-1]
        for proj in list(self)[self.num_inputs :]:  # a slice would rebuild the class
            last = proj(last)
            srcs.append(last)
        masks = [F.interpolate(padding_mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0] for src in srcs]
        pos = [mask_sine_embedding(m, self.hidden_dim // 2).to(src.dtype) for src, m in zip(srcs, masks)]
        return srcs, masks, pos
