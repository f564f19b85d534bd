"""Box helpers that torchvision does not provide."""

import torch
from torch import Tensor


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of `x`, with `x` clamped to [0, 1] and both `x` and `1 - x` kept >= eps so the result stays finite.

    Used to add box deltas in logit space (iterative box refinement); the eps is the reference's.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def apply_box_delta(delta: Tensor, reference: Tensor) -> Tensor:
    """A box predicted as a delta in logit space on a reference, before the sigmoid.

    Args:
        delta: [..., 4] (cx, cy, w, h) offsets in logit space.
        reference: [..., 4] normalized (cx, cy, w, h) boxes, or [..., 2] normalized (x, y) points; a point has no
            size, so the delta's w, h are the box size itself (in logit space).
    Returns:
        [..., 4] unactivated (cx, cy, w, h); its sigmoid is the normalized box.
    """
    if reference.shape[-1] == 4:
        return delta + inverse_sigmoid(reference)
    if reference.shape[-1] != 2:
        raise ValueError(f"reference must end with 2 (points) or 4 (boxes), got shape {tuple(reference.shape)}")
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1)
