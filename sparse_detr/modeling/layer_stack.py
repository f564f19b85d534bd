"""The stacks of identical layers that the encoder and the decoder are."""

from detectron2.config import configurable
from torch import nn

__all__ = ["LayerStack"]


class LayerStack(nn.Module):
    """`num_layers` independently initialized layers of the subclass's `layer_type`, in `self.layers` (the
    state-dict prefix `layers.<i>.` the reference uses).

    Subclasses name their config keys by `config_prefix`: MODEL.SPARSE_DETR.{prefix}_LAYERS and {prefix}_N_POINTS;
    the other hyper-parameters are the transformer's (HIDDEN_DIM, DIM_FEEDFORWARD, DROPOUT, NUM_FEATURE_LEVELS,
    NHEADS).

    Args:
        num_layers: number of layers, >= 1.
        d_model, d_ffn, dropout, n_levels, n_heads, n_points: the arguments of every layer.
    """

    layer_type: type
    config_prefix: str

    @configurable
    def __init__(
        self, num_layers: int, *, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(
                f"num_layers (MODEL.SPARSE_DETR.{self.config_prefix}_LAYERS) must be >= 1, got {num_layers}"
            )
        kwargs = dict(d_model=d_model, d_ffn=d_ffn, dropout=dropout, n_levels=n_levels, n_heads=n_heads)
        self.layers = nn.ModuleList(self.layer_type(n_points=n_points, **kwargs) for _ in range(num_layers))
        self.num_layers = num_layers
        self.d_model = d_model
        self.n_levels = n_levels

    @classmethod
    def from_config(cls, cfg):
        S = cfg.MODEL.SPARSE_DETR
        return {
            "num_layers": S[f"{cls.config_prefix}_LAYERS"],
            "d_model": S.HIDDEN_DIM,
            "d_ffn": S.DIM_FEEDFORWARD,
            "dropout": S.DROPOUT,
            "n_levels": S.NUM_FEATURE_LEVELS,
            "n_heads": S.NHEADS,
            "n_points": S[f"{cls.config_prefix}_N_POINTS"],
        }
