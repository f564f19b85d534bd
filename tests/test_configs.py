"""Every config file loads with the project's keys and builds its model, optimizer and data mapper."""
import glob
import os

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

import sparse_detr.data  # noqa: F401  registers the synthetic datasets
from sparse_detr import add_sparse_detr_config
from sparse_detr.data import DetrDatasetMapper
from sparse_detr.engine import build_optimizer, scale_schedule_to_batch_size
from sparse_detr.modeling import SparseDETR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


def test_configs_are_found():
    assert len(CONFIGS) >= 2 + 8 + 8 + 5 + 2  # bases, R50 rows, Swin-T rows, SCRL rows, demo


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads_and_builds(path):
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, path))
    cfg.MODEL.DEVICE = "cpu"
    for name in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST:
        assert name in DatasetCatalog, name
    assert cfg.MODEL.META_ARCHITECTURE == "SparseDETR"
    assert cfg.SOLVER.REFERENCE_BATCH_SIZE == cfg.SOLVER.IMS_PER_BATCH  # counts written for the configured batch
    assert scale_schedule_to_batch_size(cfg) is cfg

    torch.manual_seed(0)
    model = build_model(cfg)  # construction only: no forward on the full-size models
    assert isinstance(model, SparseDETR)
    S = cfg.MODEL.SPARSE_DETR
    assert model.rho == S.RHO and model.transformer.two_stage == S.TWO_STAGE
    groups = {g["name"]: g for g in build_optimizer(cfg, model).param_groups}
    assert set(groups) == {"default", "backbone", "linear_proj"}
    assert groups["backbone"]["lr"] == pytest.approx(cfg.SOLVER.BASE_LR * cfg.SOLVER.BACKBONE_MULTIPLIER)
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert sum(len(g["params"]) for g in groups.values()) == n_trainable

    assert DetrDatasetMapper(cfg, is_train=True).augmentations is not None
