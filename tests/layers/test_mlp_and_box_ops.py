import pytest
import torch

from sparse_detr.layers.box_ops import inverse_sigmoid
from sparse_detr.layers.mlp import MLP


def test_mlp_layers_and_relu_placement():
    mlp = MLP(4, 8, 2, num_layers=3)
    assert [(lin.in_features, lin.out_features) for lin in mlp.layers] == [(4, 8), (8, 8), (8, 2)]
    with torch.no_grad():
        for layer in mlp.layers:
            layer.weight.fill_(0)
            layer.bias.fill_(-1)
    # hidden ReLUs clip -1 to 0, the output layer does not
    assert torch.equal(mlp(torch.randn(3, 4)), torch.full((3, 2), -1.0))
    with pytest.raises(ValueError, match="num_layers"):
        MLP(4, 8, 2, num_layers=0)


def test_inverse_sigmoid_is_finite_and_inverts():
    x = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0, 1.5])
    y = inverse_sigmoid(x)
    assert torch.isfinite(y).all()
    assert torch.allclose(y[1:4].sigmoid(), x[1:4], atol=1e-6)
    assert y[-1] == y[-2]  # clamped to 1
