#!/usr/bin/env python
"""A local web page to try a model: upload a photo, slide rho (the share of encoder tokens Sparse DETR keeps at test
time, the same weights running sparser or denser), and see the detections, the tokens kept on each feature level,
the scoring network's saliency and the time the image took.

"Compare rho" runs the same image at a few rho values and plots latency and detection count against rho. The page
is served on 127.0.0.1 only, without share links or Gradio's telemetry (pip install -e .[app] installs Gradio).

Example (`make app` runs this on the weights `make demo` trains):
  python projects/SparseDETR/app.py --config-file configs/demo/sparse_detr_shapes.yaml \\
      MODEL.WEIGHTS output/demo/model_final.pth
"""

import argparse
import functools
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import Metadata
from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances
from detectron2.utils.logger import setup_logger
from matplotlib import cbook
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

try:
    import gradio as gr
except ImportError as e:
    raise ImportError(
        "the web demo needs Gradio: pip install -c requirements/constraints.txt -r requirements/app.txt "
        "(`make install` installs it)"
    ) from e

from sparse_detr import setup_cfg
from sparse_detr.data.datasets import dataset_metadata, render_synthetic_image
from sparse_detr.data.datasets.builtin import SYNTHETIC_SPLITS
from sparse_detr.data.transforms import build_test_resize
from sparse_detr.engine import SaliencyPredictor
from sparse_detr.measure import interleaved_times, synchronize
from sparse_detr.visualizer import draw_detections, draw_token_selection, kept_token_counts, make_grid

logger = logging.getLogger("sparse_detr.app")

RHO_MIN, RHO_MAX, RHO_STEP = 0.05, 1.0, 0.05
COMPARE_RHOS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
# "Compare rho" times each rho as the benchmarks do (sparse_detr.measure): rounds taking turns, after a warm-up one
COMPARE_WARMUP, COMPARE_ROUNDS = 1, 3
# A photo with a longer side above this is resized to the model's test size first: the model sees that size anyway,
# and drawing on a many-megapixel canvas would take seconds
HUGE_SIDE = 1600
# the per-level panels are drawn at most this large (longer side)
PANEL_SIDE = 256
# smaller photos are drawn enlarged to this (longer side), so that labels stay legible
DRAW_MIN_SIDE = 512
# Gradio refuses larger uploads with a message of its own
MAX_UPLOAD = "50mb"
# synthetic_shapes_val images shown as examples: the demo model was trained on shapes like these, not on them
NUM_SHAPE_EXAMPLES = 4
# real photos that a dependency ships (nothing is downloaded): matplotlib's sample data
PHOTO_EXAMPLES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")


@dataclass
class Photo:
    """An upload as the model takes it."""

    rgb: np.ndarray  # [H, W, 3] uint8
    notes: List[str] = field(default_factory=list)  # what was done to the upload, for the page


@dataclass
class Analysis:
    """One run of the model on a photo at one rho."""

    photo: Photo
    rho: Optional[float]  # None: a dense model
    instances: Instances  # on the CPU, in the photo's coordinates
    saliency: Optional[Dict[str, List[torch.Tensor]]]  # see SparseDETR.inference_with_saliency; None when dense
    seconds: float  # the predictor's call: resize, model, post-processing
    model_input: Tuple[int, int]  # (height, width) the model saw


@dataclass
class Panels:
    """What the page shows of an analysis."""

    detections: np.ndarray  # [H, W, 3] uint8 RGB
    kept: Optional[np.ndarray]  # the grid of kept-token panels, one per level; None when dense
    saliency: Optional[np.ndarray]  # the grid of saliency panels, one per level; None when dense
    table: str  # markdown


@dataclass
class RhoPoint:
    rho: float
    kept: int
    tokens: int
    seconds: float  # median over the rounds
    detections: int  # scoring at least the threshold


@dataclass
class Comparison:
    points: List[RhoPoint]
    figure: Figure
    table: str  # markdown


def photo_from_pil(image: Image.Image) -> Photo:
    """A decoded upload in any PIL mode -> 3-channel uint8 RGB, with a note for each conversion: transparency is
    laid on white, grayscale repeated to three channels, 16-bit and float pixels stretched to 0..255."""
    mode, notes = image.mode, []
    if "A" in image.getbands() or (mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        rgb = (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
        notes.append(f"{mode} image with transparency: transparent pixels are shown on white")
        return Photo(rgb, notes)
    if mode in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F"):
        gray = np.asarray(image)
        if gray.dtype != np.uint8:
            gray = gray.astype(np.float64)
            low, high = float(gray.min()), float(gray.max())
            gray = ((gray - low) * (255.0 / (high - low) if high > low else 0.0)).round().astype(np.uint8)
            notes.append(f"{mode} pixels stretched to 0..255")
        notes.append(f"grayscale image (mode {mode}): the model sees three equal channels")
        return Photo(np.repeat(gray[..., None], 3, axis=2), notes)
    if mode != "RGB":
        notes.append(f"converted from mode {mode} to RGB")
    return Photo(np.asarray(image.convert("RGB")).copy(), notes)


class PhotoInput(gr.Image):
    """Gradio's image upload whose unreadable files are a message on the page naming the file, not an exception
    from PIL (a template component: the page draws it as a gr.Image)."""

    is_template = True

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except Exception as e:
            name = getattr(payload, "orig_name", None) or "the upload"
            # PIL names the server's temporary copy of the file; the user knows it by its own name
            reason = str(e).replace(str(getattr(payload, "path", None)), name)
            raise gr.Error(f"{name} is not an image this page can read ({type(e).__name__}: {reason})") from e


def enlarged_for_drawing(rgb: np.ndarray, instances: Instances) -> Tuple[np.ndarray, Instances]:
    """A photo whose longer side is under :data:`DRAW_MIN_SIDE` enlarged to it, with its detections' boxes."""
    height, width = rgb.shape[:2]
    factor = DRAW_MIN_SIDE / max(height, width)
    if factor <= 1.0:
        return rgb, instances
    new_width, new_height = round(width * factor), round(height * factor)
    enlarged = cv2.resize(rgb, (new_width, new_height), interpolation=cv2.INTER_CUBIC)
    scaled = Instances((new_height, new_width), **instances.get_fields())
    scale = torch.tensor([new_width / width, new_height / height] * 2)
    scaled.pred_boxes = Boxes(instances.pred_boxes.tensor * scale)
    return enlarged, scaled


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


class RhoExplorer:
    """The page's work: runs a model (of ``cfg``, or ``model``) on photos at a chosen rho and draws what it did.

    Calls may come from several threads (Gradio's workers); each run sets the model's test-time rho and runs under
    one lock.
    """

    def __init__(self, cfg: CfgNode, model: Optional[nn.Module] = None):
        self.predictor = SaliencyPredictor(cfg, model)
        self.transformer = self.predictor.model.transformer
        self.sparse = self.predictor.has_saliency
        # the model's TEST_RHO, else its RHO
        self.default_rho: Optional[float] = self.transformer.inference_rho if self.sparse else None
        self.metadata = dataset_metadata(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else Metadata()
        self.resize = build_test_resize(cfg)
        self.test_size = (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        self.device = torch.device(cfg.MODEL.DEVICE)
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------------------- running
    def model_input_size(self, rgb: np.ndarray) -> Tuple[int, int]:
        """(height, width) of the model's input for the image: the config's test resize."""
        transform = self.resize.get_transform(rgb)  # reads only the shape
        if isinstance(transform, T.ResizeTransform):
            return transform.new_h, transform.new_w
        return rgb.shape[0], rgb.shape[1]

    def prepare(self, image: Image.Image) -> Photo:
        """An upload -> the photo the page runs and draws on: RGB, and resized to the model's test size when its
        longer side exceeds :data:`HUGE_SIDE` (each change noted)."""
        photo = photo_from_pil(image)
        height, width = photo.rgb.shape[:2]
        if max(height, width) > HUGE_SIDE:
            photo.rgb = np.ascontiguousarray(self.resize.get_transform(photo.rgb).apply_image(photo.rgb))
            new_height, new_width = photo.rgb.shape[:2]
            photo.notes.append(
                f"large image ({width} x {height} px): resized to the model's test size, {new_width} x {new_height} "
                f"px (INPUT.MIN_SIZE_TEST {self.test_size[0]}, INPUT.MAX_SIZE_TEST {self.test_size[1]})"
            )
        return photo

    @staticmethod
    def _check_rho(rho: float) -> None:
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"rho must be in (0, 1], got {rho}")

    def _set_rho(self, rho: float) -> None:
        self._check_rho(rho)
        self.transformer.test_rho = float(rho)

    def run(self, photo: Photo, rho: Optional[float] = None) -> Analysis:
        """The model's detections and token selection for ``photo`` at ``rho`` (default the model's; ignored by a
        dense model), and the time the predictor took (the clock read after the device's queued work)."""
        rho = None if not self.sparse else self.default_rho if rho is None else float(rho)
        bgr = np.ascontiguousarray(photo.rgb[:, :, ::-1])
        with self._lock:
            if rho is not None:
                self._set_rho(rho)
            synchronize(self.device)
            start = time.perf_counter()
            predictions, saliency = self.predictor(bgr)
            synchronize(self.device)
            seconds = time.perf_counter() - start
        return Analysis(
            photo, rho, predictions["instances"].to("cpu"), saliency, seconds, self.model_input_size(photo.rgb)
        )

    # ---------------------------------------------------------------------------------------------- drawing
    def render(self, analysis: Analysis, threshold: float) -> Panels:
        """The detections scoring at least ``threshold``, the kept tokens and saliency per level, and the table."""
        rgb, instances = enlarged_for_drawing(analysis.photo.rgb, analysis.instances)
        detections = draw_detections(rgb, instances, self.metadata, threshold)
        num_detections = int((instances.scores >= threshold).sum())
        kept_grid = saliency_grid = None
        if analysis.saliency is None:
            kept_cell = "all (a dense model)"
        else:
            heat, kept = draw_token_selection(rgb, analysis.saliency)
            counts = kept_token_counts(analysis.saliency)
            shapes = [tuple(k.shape) for k in analysis.saliency["kept"]]
            height, width = rgb.shape[:2]
            scale = PANEL_SIDE / max(height, width)
            panel_size = (max(1, round(height * scale)), max(1, round(width * scale)))
            kept_grid = make_grid(
                [kept], [[f"level {i}: {k} / {n} kept" for i, (k, n) in enumerate(counts)]], panel_size
            )
            saliency_grid = make_grid(
                [heat], [[f"level {i}: {h} x {w} tokens" for i, (h, w) in enumerate(shapes)]], panel_size
            )
            kept, total = sum(k for k, _ in counts), sum(n for _, n in counts)
            kept_cell = f"{kept} / {total} ({100.0 * kept / total:.1f} %)"
        rho_cell = "dense" if analysis.rho is None else f"{analysis.rho:.2f}"
        table = _md_table(
            ["rho", "kept tokens / all", "latency (this image)", f"detections (score ≥ {threshold:.2f})"],
            [[rho_cell, kept_cell, f"{1000.0 * analysis.seconds:.1f} ms on {self.device.type}", str(num_detections)]],
        )
        height, width = analysis.photo.rgb.shape[:2]
        input_height, input_width = analysis.model_input
        notes = [f"model input: {input_width} x {input_height} px, from the photo's {width} x {height} px"]
        notes += analysis.photo.notes
        return Panels(detections, kept_grid, saliency_grid, table + "\n\n" + "\n".join(f"- {n}" for n in notes))

    # -------------------------------------------------------------------------------------------- comparing
    def compare(
        self,
        photo: Photo,
        threshold: float,
        rhos: Sequence[float] = COMPARE_RHOS,
        warmup: int = COMPARE_WARMUP,
        rounds: int = COMPARE_ROUNDS,
    ) -> Comparison:
        """Runs ``photo`` at every rho of ``rhos``, the rhos taking turns within each of ``rounds`` timed rounds
        (after ``warmup`` untimed ones), and plots the median latency and the detections against rho."""
        if not self.sparse:
            raise ValueError("a dense model (MODEL.SPARSE_DETR.RHO 0) has no rho to vary")
        if not rhos:
            raise ValueError("give at least one rho to compare")
        for rho in rhos:  # all of them before the first run
            self._check_rho(rho)
        bgr = np.ascontiguousarray(photo.rgb[:, :, ::-1])
        outputs: Dict[float, Tuple[Dict[str, Any], Dict[str, List[torch.Tensor]]]] = {}

        def at(rho: float) -> Callable[[], None]:
            def call() -> None:
                self._set_rho(rho)
                outputs[rho] = self.predictor(bgr)

            return call

        with self._lock:
            timings = interleaved_times({f"{r:g}": at(r) for r in rhos}, warmup, rounds, self.device)
        points = []
        for rho in rhos:
            predictions, saliency = outputs[rho]
            counts = kept_token_counts(saliency)
            points.append(
                RhoPoint(
                    rho=rho,
                    kept=sum(k for k, _ in counts),
                    tokens=sum(n for _, n in counts),
                    seconds=timings.median(f"{rho:g}"),
                    detections=int((predictions["instances"].scores >= threshold).sum()),
                )
            )
        table = _md_table(
            ["rho", "kept tokens / all", "latency (median)", f"detections (score ≥ {threshold:.2f})"],
            [
                [f"{p.rho:.2f}", f"{p.kept} / {p.tokens}", f"{1000.0 * p.seconds:.1f} ms", str(p.detections)]
                for p in points
            ],
        )
        note = (
            f"median of {rounds} rounds on {self.device.type}, the rhos taking turns, after {warmup} warm-up round(s)"
        )
        return Comparison(points, self._plot(points, threshold), table + f"\n\n{note}")

    @staticmethod
    def _plot(points: Sequence[RhoPoint], threshold: float) -> Figure:
        figure = Figure(figsize=(6.4, 3.4), layout="constrained")
        latency_axis = figure.add_subplot()
        rhos = [p.rho for p in points]
        latency_axis.plot(rhos, [1000.0 * p.seconds for p in points], "o-", color="tab:blue")
        latency_axis.set_xlabel("rho (share of encoder tokens kept)")
        latency_axis.set_ylabel("latency (ms)", color="tab:blue")
        latency_axis.set_ylim(bottom=0)
        latency_axis.grid(alpha=0.3)
        count_axis = latency_axis.twinx()
        count_axis.plot(rhos, [p.detections for p in points], "s--", color="tab:orange")
        count_axis.set_ylabel(f"detections (score ≥ {threshold:.2f})", color="tab:orange")
        count_axis.set_ylim(bottom=0, top=max(1, max(p.detections for p in points)) * 1.15)
        count_axis.yaxis.get_major_locator().set_params(integer=True)
        latency_axis.set_title("the same image and weights at several rho")
        return figure


# ---------------------------------------------------------------------------------------------------- the page
def write_examples(directory: str, num_shapes: int = NUM_SHAPE_EXAMPLES) -> List[str]:
    """Example images as files: the first ``num_shapes`` images of synthetic_shapes_val (rendered, not read from
    disk) and the real photos of :data:`PHOTO_EXAMPLES` that matplotlib ships."""
    os.makedirs(directory, exist_ok=True)
    spec = SYNTHETIC_SPLITS["synthetic_shapes_val"][1]
    paths = []
    for index in range(num_shapes):
        image, _ = render_synthetic_image(spec, index)
        path = os.path.join(directory, f"shapes_val_{index:06d}.png")
        cv2.imwrite(path, image[:, :, ::-1])
        paths.append(path)
    return paths + [cbook.get_sample_data(name, asfileobj=False) for name in PHOTO_EXAMPLES]


def _on_page(fn: Callable) -> Callable:
    """A page handler whose failures are a message on the page (the traceback goes to the log only)."""

    @functools.wraps(fn)
    def handler(*args):
        try:
            return fn(*args)
        except gr.Error:
            raise
        except Exception as e:
            logger.exception(f"{fn.__name__} failed")
            raise gr.Error(f"{type(e).__name__}: {e}") from e

    return handler


_INTRO = """# Sparse DETR: test-time rho
The encoder of Sparse DETR updates only the share **rho** of its tokens that the scoring network ranks highest. rho
is a test-time knob: the same weights run sparser (faster) or denser. Upload a photo or pick an example, then move
the slider."""

_DENSE = """**This model is dense** (MODEL.SPARSE_DETR.RHO 0: Deformable or Efficient DETR): it has no scoring network,
so there is no saliency, every token is kept and there is no rho to slide. Its detections are shown."""


def build_page(explorer: RhoExplorer, examples: Sequence[str], threshold: float = 0.5) -> gr.Blocks:
    """The Gradio page of ``explorer`` (not launched)."""
    sparse = explorer.sparse

    @_on_page
    def analyze(image: Optional[Image.Image], rho: float, score_threshold: float):
        if image is None:
            return None, None, None, None, ""
        analysis = explorer.run(explorer.prepare(image), rho)
        panels = explorer.render(analysis, score_threshold)
        return analysis, panels.detections, panels.kept, panels.saliency, panels.table

    @_on_page
    def redraw(analysis: Optional[Analysis], score_threshold: float):
        if analysis is None:
            return None, None, None, ""
        panels = explorer.render(analysis, score_threshold)
        return panels.detections, panels.kept, panels.saliency, panels.table

    @_on_page
    def compare(analysis: Optional[Analysis], score_threshold: float):
        if analysis is None:
            raise gr.Error("Upload a photo or pick an example first.")
        comparison = explorer.compare(analysis.photo, score_threshold)
        return comparison.figure, comparison.table

    with gr.Blocks(title="Sparse DETR: test-time rho", analytics_enabled=False) as page:
        gr.Markdown(_INTRO if sparse else _INTRO + "\n\n" + _DENSE)
        last = gr.State(None)  # the last Analysis, redrawn when only the threshold changes
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                photo = PhotoInput(
                    label="Photo",
                    type="pil",
                    image_mode=None,  # converted by photo_from_pil, which says what it did
                    sources=["upload", "clipboard"],
                    height=300,
                    elem_id="photo",
                )
                rho = gr.Slider(
                    RHO_MIN,
                    RHO_MAX,
                    value=explorer.default_rho if sparse else RHO_MAX,
                    step=RHO_STEP,
                    label="rho: share of encoder tokens kept",
                    info=f"the model's own: {explorer.default_rho:g}" if sparse else "a dense model keeps every token",
                    interactive=sparse,
                    elem_id="rho",
                )
                score = gr.Slider(0.0, 1.0, value=threshold, step=0.05, label="score threshold", elem_id="threshold")
                compare_button = gr.Button("Compare rho", variant="primary", interactive=sparse, elem_id="compare")
                gr.Examples(examples, inputs=photo, label="Examples: synthetic shapes (the demo's data), photos")
            with gr.Column(scale=3, min_width=400):
                detections = gr.Image(
                    label="Detections", interactive=False, format="png", height=460, elem_id="detections"
                )
                table = gr.Markdown(elem_id="stats")
        with gr.Column(visible=sparse):
            gr.Markdown("### The tokens the encoder keeps, per feature level (dimmed: not updated)")
            kept = gr.Image(show_label=False, interactive=False, format="png", elem_id="kept")
            gr.Markdown("### The scoring network's saliency, per feature level (red: high, blue: low)")
            saliency = gr.Image(show_label=False, interactive=False, format="png", elem_id="saliency")
            gr.Markdown("### Compare rho")
        with gr.Row(visible=sparse):
            plot = gr.Plot(show_label=False, elem_id="compare-plot")
            compare_table = gr.Markdown(elem_id="compare-table")

        photo.change(analyze, [photo, rho, score], [last, detections, kept, saliency, table])
        rho.change(analyze, [photo, rho, score], [last, detections, kept, saliency, table])
        score.change(redraw, [last, score], [detections, kept, saliency, table])
        compare_button.click(compare, [last, score], [plot, compare_table])
    return page


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default 7860)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="the score threshold at start")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides, KEY VALUE pairs")
    return parser


def check_weights(cfg: CfgNode) -> None:
    """The page shows a trained model's detections: MODEL.WEIGHTS must name an existing file."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise ValueError("MODEL.WEIGHTS is empty: give the checkpoint to show, e.g. MODEL.WEIGHTS model_final.pth")
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(
            f"MODEL.WEIGHTS {weights}: no such file (`make demo` trains output/demo/model_final.pth)"
        )


def build(argv: Optional[Sequence[str]] = None) -> Tuple[gr.Blocks, argparse.Namespace]:
    """The page of the command line's model, warmed up (its first run is not the one the page times)."""
    args = get_parser().parse_args(argv)
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise ValueError(f"--confidence-threshold must be in [0, 1], got {args.confidence_threshold}")
    cfg = setup_cfg(args.config_file, args.opts)
    check_weights(cfg)
    explorer = RhoExplorer(cfg)
    examples = write_examples(tempfile.mkdtemp(prefix="sparse_detr_app_"))
    explorer.run(explorer.prepare(Image.open(examples[0])))
    return build_page(explorer, examples, args.confidence_threshold), args


def main(argv: Optional[Sequence[str]] = None) -> None:
    for name in ("fvcore", "detectron2", "sparse_detr"):
        setup_logger(name=name)
    # Gradio sends usage statistics unless told not to; nothing here may leave the machine
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    page, args = build(argv)
    page.launch(
        server_name="127.0.0.1",
        server_port=args.port,
        share=False,
        max_file_size=MAX_UPLOAD,
        footer_links=[],
        quiet=True,  # Gradio's own lines offer a public share link, which this page never makes
        prevent_thread_lock=True,
    )
    logger.info(f"The page: {page.local_url} (Ctrl-C stops it)")
    page.block_thread()


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, KeyError) as e:  # a missing file, a bad argument or key, a port in use
        sys.exit(f"app.py: error: {e}")
