"""Training pieces: the optimizer, schedule rescaling, CPU-aware DDP and the Trainer; the model for inference from a
config and the saliency predictor."""

from .ddp import create_ddp_model
from .inference import build_inference_model
from .optimizer import build_optimizer, check_optimizer_state, full_model_gradient_clipping, get_detr_param_groups
from .predictor import SaliencyPredictor
from .schedule import check_schedule, scale_schedule_to_batch_size
from .trainer import Trainer, check_device

__all__ = [
    "SaliencyPredictor",
    "Trainer",
    "build_inference_model",
    "build_optimizer",
    "check_device",
    "check_optimizer_state",
    "check_schedule",
    "create_ddp_model",
    "full_model_gradient_clipping",
    "get_detr_param_groups",
    "scale_schedule_to_batch_size",
]
