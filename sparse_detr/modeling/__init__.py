"""Models of this project; importing it registers `SparseDETR` in detectron2's META_ARCH_REGISTRY."""

from . import backbone  # registers build_swin_backbone in BACKBONE_REGISTRY
from .criterion import LossInputs, SetCriterion, build_weight_dict
from .deformable_decoder import DecoderOutput, DeformableDecoder, DeformableDecoderLayer
from .deformable_encoder import DeformableEncoder, DeformableEncoderLayer
from .heads import DetectionHead, DetectionHeads, HeadLayout
from .levels import FlatLevels
from .matcher import HungarianMatcher
from .meta_arch import SparseDETR
from .structures import Prediction, Target
from .token_selection import ScoringNetwork, TokenSelection, select_top_rho_tokens
from .transformer import DeformableTransformer, TransformerOutput

__all__ = [
    "DecoderOutput",
    "DeformableDecoder",
    "DeformableDecoderLayer",
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "DeformableTransformer",
    "DetectionHead",
    "DetectionHeads",
    "FlatLevels",
    "HeadLayout",
    "HungarianMatcher",
    "LossInputs",
    "Prediction",
    "ScoringNetwork",
    "SetCriterion",
    "SparseDETR",
    "Target",
    "TokenSelection",
    "TransformerOutput",
    "backbone",
    "build_weight_dict",
    "select_top_rho_tokens",
]
