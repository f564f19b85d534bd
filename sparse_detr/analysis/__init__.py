"""FLOPs and parameters of a `SparseDETR` model, counted as the paper counts them, by part of the model."""

from .breakdown import (
    flop_breakdown,
    module_groups,
    num_kept_tokens,
    parameter_breakdown,
    random_input,
    training_only_head_flops,
)
from .flops import MS_DEFORM_ATTN_OP, FlopCountAnalysis, ms_deform_attn_flop_jit

__all__ = [
    "FlopCountAnalysis",
    "MS_DEFORM_ATTN_OP",
    "flop_breakdown",
    "module_groups",
    "ms_deform_attn_flop_jit",
    "num_kept_tokens",
    "parameter_breakdown",
    "random_input",
    "training_only_head_flops",
]
