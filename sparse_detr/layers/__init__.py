from .ms_deform_attn_op import (
    ms_deform_attn,
    ms_deform_attn_available,
    ms_deform_attn_cpu_isa,
    ms_deform_attn_pytorch,
)

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_available",
    "ms_deform_attn_cpu_isa",
    "ms_deform_attn_pytorch",
]
