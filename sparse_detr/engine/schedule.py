"""Keeping a schedule's length in epochs when the total batch size changes."""
import logging

from detectron2.config import CfgNode

__all__ = ["scale_schedule_to_batch_size"]

logger = logging.getLogger(__name__)


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
    """
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
