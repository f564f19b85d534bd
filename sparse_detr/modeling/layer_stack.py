"""The stacks of identical layers that the encoder and the decoder are."""

from torch import nn

__all__ = ["LayerStack"]


class LayerStack(nn.Module):
    """`num_layers` independently initialized layers of the subclass's `layer_type`, in `self.layers` (the
    state-dict prefix `layers.<i>.` the reference uses).

    Args:
        num_layers: number of layers.
        **layer_kwargs: arguments of `layer_type`.
    """

    layer_type: type

    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(self.layer_type(**layer_kwargs) for _ in range(num_layers))
        self.num_layers = num_layers
