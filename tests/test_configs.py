"""Every config file loads with the project's keys and builds its model, optimizer and data mapper; `setup_cfg`, which
every tool builds its config with, rejects unknown keys and applies the device policy."""

import glob
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

import sparse_detr.data  # noqa: F401  registers the synthetic datasets
from sparse_detr import add_sparse_detr_config, setup_cfg
from sparse_detr.data import DetrDatasetMapper
from sparse_detr.engine import build_optimizer, scale_schedule_to_batch_size
from sparse_detr.modeling import SparseDETR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
)


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


SMOKE = os.path.join(REPO, "configs", "demo", "sparse_detr_shapes_smoke.yaml")


def test_setup_cfg_merges_the_file_then_the_overrides():
    cfg = setup_cfg(SMOKE, ["MODEL.SPARSE_DETR.RHO", "0.2", "SOLVER.MAX_ITER", "7"])
    assert cfg.is_frozen()
    assert (cfg.MODEL.SPARSE_DETR.RHO, cfg.SOLVER.MAX_ITER) == (0.2, 7)
    assert cfg.MODEL.SPARSE_DETR.DEC_LAYERS == 1  # from the file
    assert not setup_cfg(SMOKE, freeze=False).is_frozen()


def test_setup_cfg_names_bad_overrides():
    with pytest.raises(KeyError, match="Non-existent config key: MODEL.SPARSE_DETR.RHOO"):
        setup_cfg(SMOKE, ["MODEL.SPARSE_DETR.RHOO", "0.2"])
    with pytest.raises(KeyError, match="Non-existent config key: MODEL.RHO.X"):
        setup_cfg(SMOKE, ["MODEL.RHO.X", "0.2"])
    with pytest.raises(ValueError, match="KEY VALUE pairs, got an odd number"):
        setup_cfg(SMOKE, ["MODEL.SPARSE_DETR.RHO"])


def test_cuda_without_a_gpu_runs_on_the_cpu_with_one_warning(no_gpu):
    cfgs = [setup_cfg(SMOKE, ["MODEL.DEVICE", "cuda"]) for _ in range(2)]
    assert [cfg.MODEL.DEVICE for cfg in cfgs] == ["cpu", "cpu"]
    assert cfgs[0].is_frozen()
    assert [r.getMessage() for r in no_gpu.records if r.name == "sparse_detr.config"] == [
        "MODEL.DEVICE is 'cuda' but no GPU is available: running on the CPU (set MODEL.DEVICE cpu to silence this)"
    ]
    assert setup_cfg(SMOKE).MODEL.DEVICE == "cpu"  # asked for the CPU: nothing to say
    assert len([r for r in no_gpu.records if r.name == "sparse_detr.config"]) == 1
