"""The training schedule: its iteration counts checked, and kept in epochs when the total batch size changes."""

import logging

from detectron2.config import CfgNode

__all__ = ["check_schedule", "scale_schedule_to_batch_size"]

logger = logging.getLogger(__name__)


def check_schedule(cfg: CfgNode) -> None:
    """The iteration counts of a training schedule, as written, before anything reads them.

    Raises:
        ValueError: naming the key and its allowed range: ``SOLVER.MAX_ITER`` >= 1, ``SOLVER.STEPS`` increasing
            within [1, MAX_ITER - 1] (detectron2 would ignore later steps, or fail at MAX_ITER),
            ``SOLVER.WARMUP_ITERS`` >= 0, ``SOLVER.CHECKPOINT_PERIOD`` >= 1, ``TEST.EVAL_PERIOD`` >= 0 (0 = only
            after training).
    """
    s = cfg.SOLVER
    if s.MAX_ITER < 1:
        raise ValueError(f"SOLVER.MAX_ITER must be >= 1, got {s.MAX_ITER}")
    steps = list(s.STEPS)
    if any(not 1 <= x < s.MAX_ITER for x in steps) or steps != sorted(set(steps)):
        raise ValueError(
            f"SOLVER.STEPS must be increasing iterations within [1, SOLVER.MAX_ITER - 1] = [1, {s.MAX_ITER - 1}], "
            f"got {tuple(steps)} (shortening MAX_ITER? set SOLVER.STEPS too, e.g. '()' for no lr drop)"
        )
    if s.WARMUP_ITERS < 0:
        raise ValueError(f"SOLVER.WARMUP_ITERS must be >= 0, got {s.WARMUP_ITERS}")
    if s.CHECKPOINT_PERIOD < 1:
        raise ValueError(f"SOLVER.CHECKPOINT_PERIOD must be >= 1, got {s.CHECKPOINT_PERIOD}")
    if cfg.TEST.EVAL_PERIOD < 0:
        raise ValueError(f"TEST.EVAL_PERIOD must be >= 0 (0: evaluate after training only), got {cfg.TEST.EVAL_PERIOD}")


def scale_schedule_to_batch_size(cfg: CfgNode) -> CfgNode:
    """Rescale the iteration counts of ``cfg`` from ``SOLVER.REFERENCE_BATCH_SIZE`` to ``SOLVER.IMS_PER_BATCH``.

    ``MAX_ITER``, ``STEPS``, ``WARMUP_ITERS``, ``CHECKPOINT_PERIOD`` and ``TEST.EVAL_PERIOD`` are multiplied by
    ``REFERENCE_BATCH_SIZE / IMS_PER_BATCH``, so a run sees the same number of epochs and drops the lr at the same
    epoch. ``BASE_LR`` is kept: the reference trains every total batch size (8 GPUs x ``--batch_size`` 2, 3 or 4)
    with lr 2e-4, and AdamW DETR training is not tuned for the linear scaling rule that detectron2's
    ``REFERENCE_WORLD_SIZE`` applies. Afterwards ``REFERENCE_BATCH_SIZE == IMS_PER_BATCH``, so calling this again
    changes nothing. ``REFERENCE_BATCH_SIZE`` 0 turns the rescaling off.

    Returns:
        A rescaled copy (frozen if ``cfg`` was), or ``cfg`` itself when there is nothing to do.
    Raises:
        ValueError: see :func:`check_schedule`.
    """
    check_schedule(cfg)
    ref, bs = cfg.SOLVER.REFERENCE_BATCH_SIZE, cfg.SOLVER.IMS_PER_BATCH
    if ref < 0 or bs <= 0:
        raise ValueError(f"need SOLVER.REFERENCE_BATCH_SIZE >= 0 and SOLVER.IMS_PER_BATCH > 0, got {ref}, {bs}")
    if ref == 0 or ref == bs:
        return cfg
    if cfg.SOLVER.REFERENCE_WORLD_SIZE:
        raise ValueError(
            "SOLVER.REFERENCE_BATCH_SIZE and detectron2's SOLVER.REFERENCE_WORLD_SIZE both rescale the schedule; "
            "set one of them to 0"
        )
    factor = ref / bs
    cfg = cfg.clone()
    frozen = cfg.is_frozen()
    cfg.defrost()
    s = cfg.SOLVER
    s.MAX_ITER = max(1, round(s.MAX_ITER * factor))
    s.STEPS = tuple(round(x * factor) for x in s.STEPS)
    s.WARMUP_ITERS = round(s.WARMUP_ITERS * factor)
    s.CHECKPOINT_PERIOD = max(1, round(s.CHECKPOINT_PERIOD * factor))
    cfg.TEST.EVAL_PERIOD = max(1, round(cfg.TEST.EVAL_PERIOD * factor)) if cfg.TEST.EVAL_PERIOD > 0 else 0
    s.REFERENCE_BATCH_SIZE = bs
    logger.info(
        f"Schedule rescaled from batch {ref} to {bs}: MAX_ITER={s.MAX_ITER}, STEPS={s.STEPS}, "
        f"WARMUP_ITERS={s.WARMUP_ITERS}, CHECKPOINT_PERIOD={s.CHECKPOINT_PERIOD}, "
        f"EVAL_PERIOD={cfg.TEST.EVAL_PERIOD}; BASE_LR kept at {s.BASE_LR}."
    )
    if frozen:
        cfg.freeze()
    return cfg
