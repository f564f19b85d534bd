from .ms_deform_attn_op import ms_deform_attn, ms_deform_attn_available, ms_deform_attn_pytorch

__all__ = [k for k in globals().keys() if not k.startswith("_")]
