"""detectron2's DefaultTrainer with the reference's recipe and the DETR data pipeline."""

import logging
import os
import weakref
from typing import Any, Dict, Optional

import torch
from detectron2.config import CfgNode
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import SparseDetrCheckpointer
from ..config import resolve_device
from ..data.build import build_detr_test_loader, build_detr_train_loader, load_dataset_dicts
from ..data.rng import seed_all_rngs
from ..data.stream import DATA_STREAM_ID, TrainStream
from ..modeling import prepare_for_inference
from .ddp import create_ddp_model
from .optimizer import build_optimizer, check_optimizer_state
from .schedule import scale_schedule_to_batch_size

__all__ = ["Trainer"]

# RNG keys of the training steps, after the seed: another stream than the data pipeline's
STEP_STREAM_ID = DATA_STREAM_ID + 1


def check_device(cfg: CfgNode) -> CfgNode:
    """``cfg`` under the tools' device policy (:func:`sparse_detr.config.resolve_device`: CUDA without a GPU runs on
    the CPU, with a warning); fails with a clear message when AMP needs CUDA that this machine does not have."""
    cfg = resolve_device(cfg)
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        raise RuntimeError("SOLVER.AMP.ENABLED needs MODEL.DEVICE cuda (detectron2's AMPTrainer is CUDA-only)")
    return cfg


class Trainer(DefaultTrainer):
    """The paper's training loop: AdamW with three learning rates and full-model gradient clipping, the DETR
    mapper, COCO evaluation, AMP with ``SOLVER.AMP.ENABLED``, DDP on GPUs and (gloo) on CPUs.

    Checkpoints (:class:`SparseDetrCheckpointer`): written atomically, never of non-finite weights; ``MODEL.WEIGHTS``
    may have class heads for another number of classes (fine-tuning), any other shape that differs is an error.

    ``--resume`` is exact: besides the weights, the optimizer and the scheduler, a checkpoint holds the position of
    the training data (:class:`~sparse_detr.data.stream.TrainStream`), and the global RNGs are seeded at every step
    from (seed, process rank, iteration). A run killed and resumed computes, on the CPU with a fixed number of
    threads, the same losses at every iteration as the uninterrupted run.

    Everything it reads is checked before the first iteration: the test datasets are loaded when it is built, the
    training datasets when the training loader is, the schedule and the optimizer state when they are read.
    """

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__ with two changes: the schedule is rescaled to the batch size (the DETR rule,
        # see scale_schedule_to_batch_size), and CPU models are wrapped in DDP without device_ids.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = scale_schedule_to_batch_size(cfg)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        cfg = check_device(cfg)
        for name in cfg.DATASETS.TEST:
            load_dataset_dicts(
                [name], num_classes=cfg.MODEL.SPARSE_DETR.NUM_CLASSES, check_images=cfg.DATALOADER.CHECK_IMAGES
            )

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SparseDetrCheckpointer(model, cfg.OUTPUT_DIR, fine_tune=True, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def run_step(self) -> None:
        # the step's random draws (dropout, drop path) depend on where it is in the run, not on what ran before
        seed_all_rngs((self.data_loader.seed, STEP_STREAM_ID, comm.get_rank(), self.iter))
        super().run_step()

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["data"] = self.data_loader.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a checkpoint's training state (``--resume``); the optimizer's is checked against the parameters
        first (:func:`~sparse_detr.engine.optimizer.check_optimizer_state`)."""
        check_optimizer_state(self.optimizer, state_dict["_trainer"]["optimizer"], self.checkpointer.model)
        super().load_state_dict(state_dict)
        if "data" in state_dict:
            self.data_loader.load_state_dict(state_dict["data"])
        else:
            logging.getLogger(__name__).warning(
                "The checkpoint has no data position (written before resumable data streams): the training data "
                "starts again from the beginning of its stream"
            )

    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        model = build_model(check_device(cfg))
        n = sum(p.numel() for p in model.parameters())
        logging.getLogger(__name__).info(f"Model: {type(model).__name__}, {n / 1e6:.2f}M parameters")
        return model

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode) -> TrainStream:
        return build_detr_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detr_test_loader(cfg, dataset_name)

    @classmethod
    def test(cls, cfg: CfgNode, model: nn.Module, evaluators=None) -> Dict[str, Any]:
        """detectron2's evaluation, of the model prepared for inference with ``MODEL.SPARSE_DETR.FAST_INFERENCE``
        (a copy: the model being trained is left as it is)."""
        if cfg.MODEL.SPARSE_DETR.FAST_INFERENCE:
            model = prepare_for_inference(model.module if isinstance(model, DistributedDataParallel) else model)
        return super().test(cfg, model, evaluators)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
        """Box AP with the official COCO API; detections and results are written to ``OUTPUT_DIR/inference``."""
        return COCOEvaluator(
            dataset_name, tasks=("bbox",), output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        )
