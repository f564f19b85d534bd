"""Parity of an exported model with the eager one: the same image in, the detections compared."""

from typing import Callable, Dict, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..modeling.meta_arch import SparseDETR

__all__ = ["TOLERANCE", "Detections", "Parity", "compare", "eager_detections", "onnxruntime_runner", "parity_report"]

# what the issue asks of an export: scores and boxes to 1e-4, as torch.testing.assert_close(rtol, atol) reads it
TOLERANCE = 1e-4


class Detections(NamedTuple):
    """One image's detections: boxes [D, 4] xyxy pixels, scores [D], classes [D] int64 (CPU tensors)."""

    boxes: Tensor
    scores: Tensor
    classes: Tensor


class Parity(NamedTuple):
    """How far exported detections are from the eager ones.

    same_count: both kept the same number of detections; the rest compares them in order only if so.
    classes_equal: identical classes, in the same order.
    max_score_diff, max_box_diff: the largest absolute differences (boxes in pixels).
    within_tolerance: scores and boxes within `TOLERANCE` (relative or absolute) and the classes identical.
    """

    same_count: bool
    classes_equal: bool
    max_score_diff: float
    max_box_diff: float
    within_tolerance: bool


@torch.no_grad()
def eager_detections(model: SparseDETR, image: Tensor) -> Detections:
    """`model`'s own inference (eval mode) on image [3, H, W], at the image's size."""
    was_training = model.training
    model.eval()
    instances = model([{"image": image}])[0]["instances"].to("cpu")
    model.train(was_training)
    return Detections(instances.pred_boxes.tensor, instances.scores, instances.pred_classes)


def onnxruntime_runner(path: str, threads: int = 0) -> Callable[[Tensor], Detections]:
    """An onnxruntime CPU session of an exported file, as a function image [3, H, W] -> Detections.

    threads: intra-op threads (0: onnxruntime's default).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # No busy-waiting of the thread pool between runs: it would take the cores from whatever runs next (another
    # path of a benchmark, the rest of an application). No memory arena: what a run allocates goes back after it,
    # as with PyTorch, so that its peak memory shows (no measurable cost in speed here).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(image: Tensor) -> Detections:
        boxes, scores, classes = session.run(None, {"image": image.detach().cpu().numpy().astype(np.float32)})
        return Detections(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes))

    return run


def compare(expected: Detections, actual: Detections) -> Parity:
    """`actual` against `expected`, detection by detection."""
    if expected.scores.shape != actual.scores.shape:
        return Parity(False, False, float("inf"), float("inf"), False)
    scores_close = torch.allclose(actual.scores, expected.scores, rtol=TOLERANCE, atol=TOLERANCE)
    boxes_close = torch.allclose(actual.boxes, expected.boxes, rtol=TOLERANCE, atol=TOLERANCE)
    classes_equal = bool(torch.equal(actual.classes, expected.classes))
    empty = expected.scores.numel() == 0
    return Parity(
        same_count=True,
        classes_equal=classes_equal,
        max_score_diff=0.0 if empty else float((actual.scores - expected.scores).abs().max()),
        max_box_diff=0.0 if empty else float((actual.boxes - expected.boxes).abs().max()),
        within_tolerance=scores_close and boxes_close and classes_equal,
    )


def parity_report(results: Dict[str, Parity]) -> str:
    """One line per compared image."""
    lines = []
    for name, p in results.items():
        lines.append(
            f"{name}: max |score diff| {p.max_score_diff:.2e}, max |box diff| {p.max_box_diff:.2e} px, classes "
            f"{'identical' if p.classes_equal else 'DIFFER'}, {'OK' if p.within_tolerance else 'FAILED'} "
            f"(tolerance {TOLERANCE:g})"
        )
    return "\n".join(lines)
