"""Sine position encodings: for feature maps (from the padding mask) and for box coordinates."""

import math

import torch
from torch import Tensor, nn


def sine_embedding(coords: Tensor, num_pos_feats: int, temperature: float = 10000.0) -> Tensor:
    """Transformer-style sine features of scalar coordinates.

    Channel 2k is sin(c / T^(2k/F)), channel 2k+1 is cos(c / T^(2k/F)), with F = num_pos_feats.

    Args:
        coords: [...] coordinates (already scaled, e.g. to [0, 2*pi]).
    Returns:
        [..., num_pos_feats]
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos = coords[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Sine encoding of the (y, x) position of every non-padded pixel of a feature map.

    With `normalize`, positions are the cumulative count of valid pixels minus 0.5 (the pixel centre), divided by
    the valid extent of that row/column and multiplied by `scale`, so an image gets the same encoding whatever
    padding the batch adds.

    Args:
        num_pos_feats: channels per axis; the output has 2 * num_pos_feats channels (y first, then x).
        temperature: wavelength base.
        normalize: scale positions to [0, scale] by the valid extent.
        scale: the range of normalized positions.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps

    def forward(self, mask: Tensor) -> Tensor:
        """mask: [N, H, W] bool, True on padding. Returns [N, 2 * num_pos_feats, H, W] float32."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + self.eps) * self.scale
        pos_y = sine_embedding(y_embed, self.num_pos_feats, self.temperature)
        pos_x = sine_embedding(x_embed, self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale:.4f}"
        )
