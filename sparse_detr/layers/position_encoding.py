"""Sine position encodings: for feature maps (from the padding mask) and for box coordinates."""

import math

import torch
from torch import Tensor


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


def mask_sine_embedding(
    mask: Tensor,
    num_pos_feats: int,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
    eps: float = 1e-6,
) -> Tensor:
    """Sine encoding of the (y, x) position of every non-padded pixel of a feature map (DETR's
    ``PositionEmbeddingSine``, which holds no state, as a function).

    With ``normalize``, positions are the cumulative count of valid pixels minus 0.5 (the pixel centre), divided by
    the valid extent of that row/column and multiplied by ``scale``, so an image gets the same encoding whatever
    padding the batch adds.

    Args:
        mask: [N, H, W] bool, True on padding.
        num_pos_feats: channels per axis.
        temperature: wavelength base.
        normalize: scale positions to [0, scale] by the valid extent.
        scale: the range of normalized positions.
    Returns:
        [N, 2 * num_pos_feats, H, W] float32, y channels first, then x.
    """
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    if normalize:
        y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * scale
        x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * scale
    pos_y = sine_embedding(y_embed, num_pos_feats, temperature)
    pos_x = sine_embedding(x_embed, num_pos_feats, temperature)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
