"""Training pieces: the optimizer, schedule rescaling, CPU-aware DDP and the Trainer; the saliency predictor."""
from .ddp import create_ddp_model
from .optimizer import build_optimizer, full_model_gradient_clipping, get_detr_param_groups
from .predictor import SaliencyPredictor
from .schedule import scale_schedule_to_batch_size
from .trainer import Trainer, check_device
