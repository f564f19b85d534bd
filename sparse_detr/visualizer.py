"""Drawing Sparse DETR's token selection: the scoring network's saliency and the tokens kept on each feature level.

The model reports, per image, one saliency map and one kept-token mask per encoder feature level, cropped to the
image's valid (unpadded) region (see `SparseDETR.inference_with_saliency`). Each level covers the whole input image,
so every map is stretched onto the image (nearest neighbour, so that tokens stay visible as blocks).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import Metadata
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["draw_detections", "draw_token_selection", "kept_token_counts", "make_grid", "render_saliency_figure"]

# Share of brightness left on the tokens the encoder does not update.
_DIM_DROPPED = 0.25
_TITLE_HEIGHT = 22
_FONT_SCALE = 0.45


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"image must be an RGB uint8 array [H, W, 3], got {got}")


def draw_detections(
    image: np.ndarray, instances: Instances, metadata: Optional[Metadata] = None, score_threshold: float = 0.0
) -> np.ndarray:
    """detectron2's `Visualizer` drawing of the instances scoring at least `score_threshold`.

    image: [H, W, 3] RGB uint8 in the instances' coordinates -> [H, W, 3] RGB uint8
    """
    _check_image(image)
    instances = instances.to("cpu")
    if instances.has("scores"):
        instances = instances[instances.scores >= score_threshold]
    visualizer = Visualizer(image, metadata, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(instances).get_image()


def draw_token_selection(
    image: np.ndarray, saliency: Dict[str, List[torch.Tensor]]
) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """One saliency heat map and one kept-token picture per feature level, each the size of `image`.

    Saliency logits are min-max normalised jointly over all levels (the top-rho choice ranks all levels together,
    so colours compare across levels); red is high (JET colour map). On the kept-token pictures the tokens the
    encoder does not update are dimmed.

    Args:
        image: [H, W, 3] RGB uint8, the image the model saw (any resize is undone by stretching the maps).
        saliency: {"scores": L float tensors [h_l, w_l], "kept": L bool tensors [h_l, w_l]}.
    Returns:
        (saliency panels, kept panels): two lists of L arrays [H, W, 3] RGB uint8.
    """
    _check_image(image)
    for key in ("scores", "kept"):
        if key not in saliency:
            raise ValueError(f"saliency must have the key {key!r}, got keys {sorted(saliency)}")
    scores = [s.detach().float().cpu().numpy() for s in saliency["scores"]]
    kept = [k.detach().cpu().numpy().astype(bool) for k in saliency["kept"]]
    if len(scores) != len(kept) or any(s.shape != k.shape or s.ndim != 2 for s, k in zip(scores, kept)):
        raise ValueError(
            "saliency['scores'] and saliency['kept'] must be lists of 2-d maps of equal shapes, got "
            f"{[s.shape for s in scores]} and {[k.shape for k in kept]}"
        )
    height, width = image.shape[:2]
    low = min(float(s.min()) for s in scores)
    high = max(float(s.max()) for s in scores)
    scale = 255.0 / (high - low) if high > low else 0.0

    heat_panels, kept_panels = [], []
    for level_scores, level_kept in zip(scores, kept):
        heat = np.clip((level_scores - low) * scale, 0, 255).astype(np.uint8)
        heat = cv2.resize(heat, (width, height), interpolation=cv2.INTER_NEAREST)
        heat = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
        heat_panels.append(cv2.addWeighted(image, 0.4, heat, 0.6, 0.0))

        mask = cv2.resize(level_kept.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        factor = np.where(mask[..., None] > 0, 1.0, _DIM_DROPPED)
        kept_panels.append((image * factor).astype(np.uint8))
    return heat_panels, kept_panels


def kept_token_counts(saliency: Dict[str, List[torch.Tensor]]) -> List[Tuple[int, int]]:
    """(kept, all) tokens of each feature level of one image: ``saliency["kept"]`` holds L bool maps [h_l, w_l]
    (see :func:`draw_token_selection`), cropped to the image, so padding tokens are not counted."""
    if "kept" not in saliency:
        raise ValueError(f"saliency must have the key 'kept', got keys {sorted(saliency)}")
    return [(int(k.sum()), k.numel()) for k in saliency["kept"]]


def make_grid(
    rows: Sequence[Sequence[np.ndarray]], titles: Sequence[Sequence[str]], panel_size: Tuple[int, int]
) -> np.ndarray:
    """Panels resized to `panel_size` (height, width), each under a title strip, on a white grid.

    Rows may differ in length; the grid is as wide as the longest row.
    """
    if len(rows) != len(titles) or any(len(r) != len(t) for r, t in zip(rows, titles)):
        raise ValueError("make_grid: rows and titles must have the same layout")
    ph, pw = panel_size
    cell_h = ph + _TITLE_HEIGHT
    ncols = max(len(r) for r in rows)
    grid = np.full((cell_h * len(rows), pw * ncols, 3), 255, dtype=np.uint8)
    for i, (row, row_titles) in enumerate(zip(rows, titles)):
        for j, (panel, title) in enumerate(zip(row, row_titles)):
            _check_image(panel)
            y, x = i * cell_h, j * pw
            grid[y + _TITLE_HEIGHT : y + cell_h, x : x + pw] = cv2.resize(panel, (pw, ph), interpolation=cv2.INTER_AREA)
            # shrink the font of titles wider than the panel
            width = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, _FONT_SCALE, 1)[0][0]
            scale = _FONT_SCALE * min(1.0, (pw - 8) / max(width, 1))
            cv2.putText(grid, title, (x + 4, y + 16), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return grid


def render_saliency_figure(
    image: np.ndarray,
    instances: Instances,
    saliency: Optional[Dict[str, List[torch.Tensor]]],
    metadata: Optional[Metadata] = None,
    score_threshold: float = 0.0,
    max_panel_side: int = 480,
) -> np.ndarray:
    """The demo's picture of one image, RGB uint8.

    With saliency, a grid of 2 rows x (1 + L) panels: detections and the saliency of each level on top, the input
    and the tokens kept on each level below. Without (a dense model), the detections alone at full size.

    Args:
        image: [H, W, 3] RGB uint8, in the coordinates of `instances`.
        instances: the model's detections for the image.
        saliency: see :func:`draw_token_selection`, or None.
        metadata: class names for the labels.
        score_threshold: detections below it are not drawn.
        max_panel_side: panels are shrunk (aspect kept) so that their longer side is at most this.
    """
    detections = draw_detections(image, instances, metadata, score_threshold)
    if saliency is None:
        return detections
    heat, kept = draw_token_selection(image, saliency)
    height, width = image.shape[:2]
    shrink = min(1.0, max_panel_side / max(height, width))
    panel_size = (max(1, round(height * shrink)), max(1, round(width * shrink)))

    num_levels = len(heat)
    counts = kept_token_counts(saliency)
    total_kept, total_tokens = sum(k for k, _ in counts), sum(n for _, n in counts)
    rows = [[detections] + heat, [image] + kept]
    titles = [
        [f"detections (score >= {score_threshold:g})"] + [f"saliency, level {lvl}" for lvl in range(num_levels)],
        [f"input, kept {total_kept}/{total_tokens} tokens"]
        + [f"kept level {lvl}: {kept}/{tokens}" for lvl, (kept, tokens) in enumerate(counts)],
    ]
    return make_grid(rows, titles, panel_size)
