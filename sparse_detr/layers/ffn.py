"""The feed-forward block of the encoder and decoder layers: linear, ReLU, dropout, linear, dropout, residual,
LayerNorm (post-norm, as Deformable DETR)."""

from typing import Tuple

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ffn_modules", "post_norm_ffn"]


def ffn_modules(
    d_model: int, d_ffn: int, dropout: float
) -> Tuple[nn.Linear, nn.Dropout, nn.Linear, nn.Dropout, nn.LayerNorm]:
    """(linear1, inner dropout, linear2, outer dropout, norm), created in this order. The layer registers them under
    its own attribute names: the reference's, which checkpoints pin (they differ between encoder and decoder)."""
    return (
        nn.Linear(d_model, d_ffn),
        nn.Dropout(dropout),
        nn.Linear(d_ffn, d_model),
        nn.Dropout(dropout),
        nn.LayerNorm(d_model),
    )


def post_norm_ffn(
    x: Tensor, linear1: nn.Linear, inner: nn.Dropout, linear2: nn.Linear, outer: nn.Dropout, norm: nn.LayerNorm
) -> Tensor:
    """x: [..., C] -> norm(x + outer(linear2(inner(relu(linear1(x))))))."""
    return norm(x + outer(linear2(inner(F.relu(linear1(x))))))
