"""The Trainer on the CPU: an iteration, its guards, and evaluation with COCOEvaluator."""

import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import SimpleTrainer

import sparse_detr  # noqa: F401
from sparse_detr import add_sparse_detr_config
from sparse_detr.data.datasets import SyntheticShapesSpec, register_synthetic_shapes
from sparse_detr.engine import Trainer

TRAIN, VAL = "test_engine_shapes_train", "test_engine_shapes_val"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    register_synthetic_shapes(
        TRAIN, str(root / "train"), SyntheticShapesSpec(num_images=6, height=64, width=64, seed=1)
    )
    register_synthetic_shapes(VAL, str(root / "val"), SyntheticShapesSpec(num_images=3, height=64, width=64, seed=2))
    yield
    for name in (TRAIN, VAL):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture
def cfg(shapes, tmp_path):
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file("configs/demo/sparse_detr_shapes_smoke.yaml")
    cfg.merge_from_list(
        [
            "DATASETS.TRAIN",
            (TRAIN,),
            "DATASETS.TEST",
            (VAL,),
            "OUTPUT_DIR",
            str(tmp_path),
            "SOLVER.MAX_ITER",
            1,
            "SOLVER.STEPS",
            (),
            "SEED",
            0,
        ]
    )
    return cfg


def test_one_iteration_updates_every_group_and_evaluates(cfg):
    trainer = Trainer(cfg)
    assert isinstance(trainer._trainer, SimpleTrainer)
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["default", "backbone", "linear_proj"]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.iter == 1  # detectron2 leaves iter at max_iter after the loop
    changed = {n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any(n.startswith("backbone.") for n in changed)
    assert any("sampling_offsets" in n for n in changed) and any(n.startswith("class_embed") for n in changed)
    history = trainer.storage.history("total_loss").values()
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0][0]))
    # The final evaluation ran through COCOEvaluator on the test split and the final checkpoint was written.
    assert set(trainer._last_eval_results["bbox"]) >= {"AP", "AP50", "AP75"}
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "inference", "coco_instances_results.json"))
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))


def test_non_finite_loss_stops_training(cfg):
    trainer = Trainer(cfg)
    trainer._trainer.model.forward = lambda batched_inputs: {"loss_ce": torch.tensor(float("nan"), requires_grad=True)}
    with pytest.raises(FloatingPointError, match="Loss became infinite or NaN"):
        trainer.train()


def test_cuda_without_a_gpu_falls_back_but_amp_fails_before_building(cfg, no_gpu):
    cfg.MODEL.DEVICE = "cuda"
    trainer = Trainer(cfg)
    assert trainer.cfg.MODEL.DEVICE == "cpu"
    assert all(p.device.type == "cpu" for p in trainer.model.parameters())
    assert [r.getMessage() for r in no_gpu.records if r.name == "sparse_detr.config"] == [
        "MODEL.DEVICE is 'cuda' but no GPU is available: running on the CPU (set MODEL.DEVICE cpu to silence this)"
    ]
    for device in ("cuda", "cpu"):
        cfg.MODEL.DEVICE = device
        cfg.SOLVER.AMP.ENABLED = True
        with pytest.raises(RuntimeError, match="SOLVER.AMP.ENABLED needs MODEL.DEVICE cuda"):
            Trainer(cfg)


def test_bad_test_dataset_fails_before_training(cfg):
    cfg.DATASETS.TEST = ("synthetic_shapes_vla",)
    with pytest.raises(KeyError, match="'synthetic_shapes_vla' is not registered"):
        Trainer(cfg)


def test_batch_size_change_rescales_the_schedule(cfg):
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.CHECKPOINT_PERIOD = 8, (6,), 4
    cfg.SOLVER.IMS_PER_BATCH = 4  # the smoke config is written for 2
    trainer = Trainer(cfg)
    assert (trainer.max_iter, trainer.cfg.SOLVER.STEPS, trainer.cfg.SOLVER.CHECKPOINT_PERIOD) == (4, (3,), 2)
    assert trainer.optimizer.param_groups[0]["lr"] == cfg.SOLVER.BASE_LR


def test_divergence_stops_at_the_first_non_finite_step_without_checkpointing_it(cfg):
    """lr 1e10: the first step makes the weights huge, the second step's predictions overflow."""
    cfg.merge_from_list(["SOLVER.BASE_LR", 1e10, "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 1])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    with pytest.raises(
        FloatingPointError,
        match=r"Non-finite predictions at iteration 1: logits \(loss_ce\), "
        r"boxes \(loss_bbox\), .*SOLVER.BASE_LR",
    ):
        trainer.train()
    assert sorted(f for f in os.listdir(cfg.OUTPUT_DIR) if f.endswith(".pth")) == ["model_0000000.pth"]
    last = trainer.checkpointer.get_checkpoint_file()
    weights = torch.load(last, weights_only=False)["model"]
    assert all(v.isfinite().all() for v in weights.values() if v.is_floating_point())


def test_resume_after_a_shape_change_fails_before_any_step(cfg):
    Trainer(cfg).train()  # writes model_final.pth and last_checkpoint
    cfg.MODEL.SPARSE_DETR.DIM_FEEDFORWARD = 32  # the smoke config's is 64
    cfg.SOLVER.MAX_ITER = 3
    trainer = Trainer(cfg)
    with pytest.raises(
        ValueError,
        match=r"Cannot load .*model_final.pth \(resumed\): tensors of other shapes than "
        r"the model's: transformer.encoder.layers.0.linear1.weight: \(64, 64\) in "
        r"the checkpoint, \(32, 64\) in the model.*a resumed run must have the "
        r"shapes it was saved with",
    ):
        trainer.resume_or_load(resume=True)
