#!/usr/bin/env python
"""Train or evaluate Sparse DETR (and the Deformable/Efficient DETR rows) with detectron2.

    python train_net.py --config-file configs/r50/sparse_detr_rho_0.1.yaml --num-gpus 8
    python train_net.py --config-file configs/demo/sparse_detr_shapes.yaml            # the CPU demo
    python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <checkpoint.pth>
    python train_net.py --config-file <cfg> --num-gpus 8 --resume                    # continue a killed run

Multi-node: add ``--num-machines N --machine-rank R --dist-url tcp://<ip of rank 0>:<port>``. Without CUDA,
``--num-gpus N`` starts N CPU processes that talk over gloo.
"""

import argparse
import logging
import os
from typing import Any, Dict, Optional

# OpenMP threads that spin while they wait stall each other when the cores are oversubscribed (several processes, or
# other work on the same cores), which can make a training step several times slower than with sleeping waiters.
# Must be set before torch loads OpenMP; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import sparse_detr  # noqa: F401  registers the meta-architecture, the backbones and the synthetic datasets
from sparse_detr import setup_cfg
from sparse_detr.checkpoint import SparseDetrCheckpointer
from sparse_detr.data.build import load_dataset_dicts
from sparse_detr.engine import Trainer


def setup(args: argparse.Namespace) -> CfgNode:
    cfg = setup_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    # default_setup logs "detectron2" and "fvcore"; this package's messages (dataset generation, schedule
    # rescaling, image cache) go to the same console and log file.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="sparse_detr")
    return cfg


def main(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """The evaluation results with --eval-only; after training, what DefaultTrainer.train returns."""
    cfg = setup(args)
    if args.eval_only:
        if not cfg.MODEL.WEIGHTS and not args.resume:
            logging.getLogger("detectron2").warning("MODEL.WEIGHTS is empty: evaluating a randomly initialized model")
        for name in cfg.DATASETS.TEST:  # fail on a bad dataset before building the model
            load_dataset_dicts(
                [name], num_classes=cfg.MODEL.SPARSE_DETR.NUM_CLASSES, check_images=cfg.DATALOADER.CHECK_IMAGES
            )
        model = Trainer.build_model(cfg)
        SparseDetrCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
