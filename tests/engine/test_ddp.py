"""DDP wrapping: a single process is left alone, and DDP needs no find_unused_parameters for any variant."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from paper_variants import PAPER_VARIANTS, RECIPE, set_sparse_detr_keys
from torch import nn

import sparse_detr  # noqa: F401
from sparse_detr import add_sparse_detr_config
from sparse_detr.engine import create_ddp_model

VARIANTS = {k: PAPER_VARIANTS[k] for k in ("deformable_detr", "deformable_detr_bbr_two_stage", "sparse_detr_enc_aux")}
VARIANTS["recipe"] = RECIPE  # foreground target, denoising, mixed query selection, look-forward-twice


def test_single_process_model_is_not_wrapped():
    model = nn.Linear(2, 2)
    assert create_ddp_model(model, broadcast_buffers=False) is model


@pytest.mark.parametrize("empty_batch", [False, True])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_trainable_parameter_gets_a_gradient(variant, empty_batch):
    """DistributedDataParallel (without find_unused_parameters) hangs or fails on a parameter without gradient;
    this includes a batch with an image that has no boxes, and a batch without boxes (one process's share may be
    one: then there is no denoising query, and the label embedding must still get its gradient)."""
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file("configs/demo/sparse_detr_shapes_smoke.yaml")
    for key in ("WITH_BOX_REFINE", "TWO_STAGE", "EFF_QUERY_INIT", "EFF_SPECIFIC_HEAD", "USE_ENC_AUX_LOSS"):
        cfg.MODEL.SPARSE_DETR[key] = False
    cfg.MODEL.SPARSE_DETR.RHO = 0.0
    set_sparse_detr_keys(cfg, VARIANTS[variant])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = []
    for boxes in ([] if empty_batch else [[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]], []):
        inst = Instances(
            (64, 64),
            gt_boxes=Boxes(torch.tensor(boxes).reshape(-1, 4)),
            gt_classes=torch.arange(len(boxes), dtype=torch.int64),
        )
        batch.append({"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "instances": inst})
    sum(model(batch).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
