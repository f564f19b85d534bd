"""The schedule's counts are checked, and it keeps its length in epochs when the total batch size changes."""

import math

import pytest
from detectron2.config import get_cfg

from sparse_detr import add_sparse_detr_config
from sparse_detr.engine import scale_schedule_to_batch_size


def base_cfg():
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file("configs/Base-SparseDETR.yaml")
    return cfg


def test_base_config_states_the_paper_schedule():
    s = base_cfg().SOLVER
    epoch = math.ceil(118287 / 8) // 2  # 8 workers x 2 images, as the base config explains
    assert s.REFERENCE_BATCH_SIZE == s.IMS_PER_BATCH == 16
    assert (s.MAX_ITER, s.STEPS) == (50 * epoch, (40 * epoch,))
    assert s.BASE_LR == 2e-4 and s.CHECKPOINT_PERIOD == epoch


def test_batch_32_halves_the_iterations_and_keeps_the_lr():
    cfg = base_cfg()
    cfg.SOLVER.IMS_PER_BATCH = 32
    cfg.freeze()
    out = scale_schedule_to_batch_size(cfg)
    assert out.is_frozen() and cfg.SOLVER.MAX_ITER == 369650  # input untouched
    assert (out.SOLVER.MAX_ITER, out.SOLVER.STEPS, out.SOLVER.CHECKPOINT_PERIOD) == (184825, (147860,), 3696)
    assert out.TEST.EVAL_PERIOD == 3696 and out.SOLVER.BASE_LR == 2e-4
    assert out.SOLVER.REFERENCE_BATCH_SIZE == 32
    assert scale_schedule_to_batch_size(out) is out  # idempotent


def test_smaller_batch_lengthens_and_zero_disables():
    cfg = base_cfg()
    cfg.SOLVER.IMS_PER_BATCH = 8
    out = scale_schedule_to_batch_size(cfg)
    assert out.SOLVER.MAX_ITER == 2 * 369650 and out.SOLVER.STEPS == (2 * 295720,)
    cfg.SOLVER.REFERENCE_BATCH_SIZE = 0
    assert scale_schedule_to_batch_size(cfg) is cfg


def test_refuses_to_combine_with_reference_world_size():
    cfg = base_cfg()
    cfg.SOLVER.IMS_PER_BATCH = 8
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 8
    with pytest.raises(ValueError, match="REFERENCE_WORLD_SIZE"):
        scale_schedule_to_batch_size(cfg)


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "SOLVER.STEPS",
            (369650,),
            r"SOLVER\.STEPS must be increasing iterations within \[1, SOLVER\.MAX_ITER - 1\] "
            r"= \[1, 369649\], got \(369650,\)",
        ),
        ("SOLVER.STEPS", (400000,), r"SOLVER\.STEPS must be .* got \(400000,\)"),
        ("SOLVER.STEPS", (200, 100), r"SOLVER\.STEPS must be increasing"),
        ("SOLVER.STEPS", (0,), r"SOLVER\.STEPS must be"),
        ("SOLVER.MAX_ITER", 0, r"SOLVER\.MAX_ITER must be >= 1, got 0"),
        ("SOLVER.WARMUP_ITERS", -1, r"SOLVER\.WARMUP_ITERS must be >= 0"),
        ("SOLVER.CHECKPOINT_PERIOD", 0, r"SOLVER\.CHECKPOINT_PERIOD must be >= 1"),
        ("TEST.EVAL_PERIOD", -5, r"TEST\.EVAL_PERIOD must be >= 0"),
    ],
)
def test_bad_schedule_names_the_key_and_its_range(key, value, message):
    cfg = base_cfg()
    if key != "SOLVER.STEPS":
        cfg.SOLVER.STEPS = ()
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=message):
        scale_schedule_to_batch_size(cfg)
