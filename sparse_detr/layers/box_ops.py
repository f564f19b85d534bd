"""Box helpers that torchvision does not provide."""
import torch
from torch import Tensor


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of `x`, with `x` clamped to [0, 1] and both `x` and `1 - x` kept >= eps so the result stays finite.

    Used to add box deltas in logit space (iterative box refinement); the eps is the reference's.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
