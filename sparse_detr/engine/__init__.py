"""Training pieces: the optimizer, schedule rescaling, CPU-aware DDP and the Trainer; the saliency predictor."""
from .ddp import create_ddp_model
from .optimizer import build_optimizer, check_optimizer_state, full_model_gradient_clipping, get_detr_param_groups
from .predictor import SaliencyPredictor
from .schedule import check_schedule, scale_schedule_to_batch_size
from .trainer import Trainer, check_device
