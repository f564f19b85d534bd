"""Every script in projects/SparseDETR runs from the command line: its arguments reach the package.

The scripts' functions are tested in-process (tests/projects/test_<script>.py); here each script runs once as a
subprocess on something tiny, or stops at an argument check of its own. Every start imports torch and detectron2,
so all of them start at once and the tests read their results (the slow tier: `make test-all`).
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from sparse_detr import setup_cfg

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "projects" / "SparseDETR"
# a tiny Sparse DETR (R18, hidden 64, rho 0.3, 4 classes), random weights, MODEL.DEVICE cpu
SMOKE = str(ROOT / "configs" / "demo" / "sparse_detr_shapes_smoke.yaml")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("command_lines")


def _commands(workdir: Path, own_coco_dataset) -> Dict[str, List[str]]:
    image = workdir / "image.png"
    cv2.imwrite(str(image), np.full((48, 64, 3), 120, dtype=np.uint8))
    own = "[('command_lines_own', '{}', '{}')]".format(*own_coco_dataset(workdir / "own"))
    weights = workdir / "smoke.pth"  # the demo shows a model's detections: it needs weights (random ones here)
    torch.save({"model": build_model(setup_cfg(SMOKE, ["MODEL.DEVICE", "cpu"])).state_dict()}, weights)
    return {
        "analyze_model": ["analyze_model.py", "--config-file", SMOKE, "--tasks", "parameter"],
        # a dataset of one's own, registered by the config keys (as train_net.py and demo.py take them)
        "analyze_model on own data": [
            "analyze_model.py",
            "--config-file",
            SMOKE,
            "--tasks",
            "flop",
            "-n",
            "2",
            "DATASETS.REGISTER_COCO_INSTANCES",
            own,
            "DATASETS.TEST",
            "('command_lines_own',)",
            "MODEL.SPARSE_DETR.NUM_CLASSES",
            "3",
        ],
        "analyze_model --eval-only": [
            "analyze_model.py",
            "--config-file",
            SMOKE,
            "--tasks",
            "parameter",
            "--eval-only",
        ],
        "benchmark": [
            "benchmark.py",
            "--configs",
            SMOKE,
            "--baseline",
            SMOKE,
            "--batch-sizes",
            "1",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--input-size",
            "64",
            "96",
            "--threads",
            "1",
        ],
        "bench_op --help": ["bench_op.py", "--help"],
        # MODEL.DEVICE cuda: on a machine without a GPU, the device policy's fallback
        "demo": [
            "demo.py",
            "--config-file",
            SMOKE,
            "--input",
            str(image),
            "--output",
            str(workdir / "out.png"),
            "MODEL.WEIGHTS",
            str(weights),
            "MODEL.DEVICE",
            "cuda",
        ],
        "convert_reference_checkpoint": [
            "convert_reference_checkpoint.py",
            "--config-file",
            SMOKE,
            str(workdir / "missing.pth"),
            str(workdir / "out.pth"),
        ],
        "convert_scrl to .pth": ["convert_scrl.py", str(workdir / "a.pth"), str(workdir / "b.pth")],
        # the table trains for hours: its own check of the variants, before anything runs
        "convergence": ["convergence.py", "--skip-training", "--variants", "dam", "dino"],
        # the web page starts only with the weights it is to show (it is served in tests/projects/test_app_browser.py)
        "app without its weights": ["app.py", "--config-file", SMOKE, "MODEL.WEIGHTS", str(workdir / "missing.pth")],
    }


@pytest.fixture(scope="module")
def runs(workdir, own_coco_dataset) -> Dict[str, Tuple[int, str]]:
    """(exit status, stdout and stderr) of each command of :func:`_commands`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(TOOLS / argv[0]), *argv[1:]],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, argv in _commands(workdir, own_coco_dataset).items()
    }
    outputs = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    return {name: (proc.returncode, outputs[name]) for name, proc in procs.items()}


def _output(runs, name: str, ok: bool) -> str:
    rc, out = runs[name]
    assert (rc == 0) == ok, f"exit status {rc}:\n{out[-3000:]}"
    return out


def test_analyze_model(runs):
    out = _output(runs, "analyze_model", ok=True)
    assert "Parameters (4 classes)" in out and "| total " in out
    out = _output(runs, "analyze_model on own data", ok=True)
    assert "mean over the first 2 images of command_lines_own" in out
    out = _output(runs, "analyze_model --eval-only", ok=False)
    assert "runs in one process: --eval-only and --num-gpus do not apply" in out


def test_benchmark(runs):
    out = _output(runs, "benchmark", ok=True)
    assert "input 64x96" in out and "| Sparse DETR (rho=0.3) |" in out


def test_bench_op(runs):
    assert "--calls" in _output(runs, "bench_op --help", ok=True)


def test_demo(runs, workdir):
    out = _output(runs, "demo", ok=True)
    assert cv2.imread(str(workdir / "out.png")) is not None
    fallback = "MODEL.DEVICE is 'cuda' but no GPU is available: running on the CPU"
    assert (fallback in out) == (not torch.cuda.is_available())


def test_converters(runs):
    out = _output(runs, "convert_reference_checkpoint", ok=False)
    assert "FileNotFoundError: reference checkpoint: no such file" in out and "missing.pth" in out
    rc, out = runs["convert_scrl to .pth"]
    assert rc == 2 and "output must end with .pkl" in out  # argparse's usage error, before reading the input


def test_convergence(runs):
    out = _output(runs, "convergence", ok=False)
    assert "--variants: ['dino']; choose from ['dam', 'foreground', 'salience', 'dam_dn', 'recipe']" in out


def test_app_names_missing_weights(runs, workdir):
    out = _output(runs, "app without its weights", ok=False)
    assert f"app.py: error: MODEL.WEIGHTS {workdir / 'missing.pth'}: no such file" in out
    assert "Traceback" not in out
