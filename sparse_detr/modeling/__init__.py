"""Models of this project; importing it registers `SparseDETR` in detectron2's META_ARCH_REGISTRY."""

from . import backbone  # registers build_swin_backbone in BACKBONE_REGISTRY
from .criterion import LossInputs, SetCriterion, build_weight_dict
from .deformable_decoder import DecoderOutput, DeformableDecoder, DeformableDecoderLayer
from .deformable_encoder import DeformableEncoder, DeformableEncoderLayer
from .fast_inference import InferenceBackbone, prepare_for_inference
from .heads import DetectionHead, DetectionHeads, HeadLayout
from .levels import FlatLevels
from .matcher import HungarianMatcher
from .meta_arch import SparseDETR
from .neck import MultiLevelNeck
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
    "InferenceBackbone",
    "LossInputs",
    "MultiLevelNeck",
    "Prediction",
    "ScoringNetwork",
    "SetCriterion",
    "SparseDETR",
    "Target",
    "TokenSelection",
    "TransformerOutput",
    "backbone",
    "build_weight_dict",
    "prepare_for_inference",
    "select_top_rho_tokens",
]
