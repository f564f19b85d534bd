"""Models of this project; importing it registers `SparseDETR` in detectron2's META_ARCH_REGISTRY."""
from . import backbone  # registers build_swin_backbone in BACKBONE_REGISTRY
from .criterion import SetCriterion, build_weight_dict
from .deformable_decoder import DeformableDecoder, DeformableDecoderLayer
from .deformable_encoder import DeformableEncoder, DeformableEncoderLayer
from .matcher import HungarianMatcher
from .meta_arch import SparseDETR
from .token_selection import MaskPredictor, select_top_rho_tokens
from .transformer import DeformableTransformer

__all__ = [k for k in globals().keys() if not k.startswith("_")]
