"""scripts/gpu_check.py (`make gpu-check`): its dry run on the CPU with tiny sizes, so that the script cannot rot, and
how it reports a spent time budget and a machine without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_detr.layers import ms_deform_attn_available

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not ms_deform_attn_available(), reason="sparse_detr._C is not built")
def test_dry_run(tmp_path):
    out = tmp_path / "out"
    # A make of its own, not a sub-make of the one that may run the tests (`make test`).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(
        [
            "make",
            "-s",
            "gpu-check",
            "DRY_RUN=1",
            f"OUT={out}",
            f"CHECK_PY={sys.executable}",
            f"WHEELS={tmp_path / 'no_wheels'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{json.dumps(summary['steps'], indent=1)}"
    assert sorted(os.listdir(out)) == [
        "bench_op.log",
        "setup.log",
        "summary.json",
        "summary.md",
        "tests.log",
        "throughput.log",
        "train.log",
    ]  # at most 8: the device tool's limit
    assert summary["dry_run"] and summary["passed"]
    assert [s["step"] for s in summary["steps"]] == [
        "environment",
        "install",
        "build",
        "tests",
        "train",
        "throughput",
        "bench_op",
    ]
    assert all(s["status"] == "passed" for s in summary["steps"])

    # what the tools and pytest reported, read from their own JSON and JUnit XML
    counts = summary["tests"]["counts"]
    assert summary["environment"]["torch"] and counts["tests"] > 0 and counts["failures"] == counts["errors"] == 0
    assert [(r["call"], r["device, dtype"]) for r in summary["bench_op"]["rows"]] == [("decoder", "cpu, float32")]

    rows = summary["throughput"]["rows"]
    assert [r["model"] for r in rows] == ["Deformable DETR + BBR + two-stage"] + [
        f"Sparse DETR (rho={rho})" for rho in (0.1, 0.2, 0.3, 0.4, 0.5)
    ]
    assert [r["paper B4FPS ratio"] for r in rows] == [1.0, 1.46, 1.36, 1.27, 1.20, 1.13]
    for r in rows:
        assert all(r[f"{p} B{b} s/img"] > 0 for p in ("fp32", "amp") for b in (1, 2))
    assert rows[0]["fp32 B2 speed-up"] == 1.0

    train = summary["train"]  # train_net.py's metrics.json
    assert train["iterations"] == 3 and train["losses_finite"]
    assert train["loss_start"] > 0 and train["loss_end"] > 0 and train["seconds_per_iteration"] > 0

    text = (out / "summary.md").read_text()
    assert "dry run" in text and "| paper B4FPS ratio |" in text and "loss_start" in text


def test_a_spent_budget_is_reported_and_fails(tmp_path):
    done = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", str(tmp_path), "--dry-run", "--budget", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not summary["passed"]
    assert summary["steps"] == [
        {
            "step": "environment",
            "log": "setup.log",
            "status": "not run",
            "detail": "the time budget was spent",
            "seconds": 0.0,
        }
    ]
    assert "not run" in (tmp_path / "summary.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there: the real check would run")
def test_without_a_gpu_the_check_stops_after_recording_the_environment(tmp_path):
    done = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("environment", "failed")]
    assert summary["environment"]["torch"] == torch.__version__ and not summary["environment"]["cuda_available"]
    assert "torch sees no GPU" in (tmp_path / "setup.log").read_text()
