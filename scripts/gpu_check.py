#!/usr/bin/env python3
"""`make gpu-check OUT=<folder>`: everything this project runs on a GPU, checked in one go on a machine with one.

It only sequences the project's own tools and its test suite, each in a process of its own, and sums up what they
report (their JSON, pytest's JUnit XML, detectron2's metrics.json) in summary.md and summary.json:
  environment  the GPU, its driver, torch, CUDA and nvcc versions;
  install      what requirements/gpu-check.txt and detectron2 need, from the wheels `make gpu-wheels` prepared
               (--wheels), offline: pip skips whatever the machine already has;
  build        the extension with its CUDA kernels, for the GPU present, against the torch found there;
  tests        tests/layers with the CUDA tests (a CUDA test skipped for want of a GPU fails this step);
  train        train_net.py, 100 AMP iterations of R50 Sparse DETR rho = 0.1 on the synthetic shapes at COCO's size;
  throughput   projects/SparseDETR/benchmark.py in fp32 and AMP, beside the paper's B4FPS ratios;
  bench_op     projects/SparseDETR/bench_op.py: the op against the grid_sample reference in float32, float16 and
               bfloat16, at encoder, sparse-encoder and decoder sizes.
A step that fails is recorded and the next one runs, except that nothing runs after a failed install or build. The
whole run keeps within --budget seconds (480); a step gets what is left of it, at most its own cap (STEP_CAPS). At
most 8 files land in OUT. Exit status 0 when every step passed.

--dry-run runs the same steps on the CPU with tiny sizes (the build is kept when the extension already loads), so
that a test can call it (tests/test_gpu_check.py).

Only the standard library is imported here (the install step comes first). Run it with the Python to check.
"""

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import Any, Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "projects", "SparseDETR")
# Sparse DETR's B4FPS over that of Deformable DETR + BBR + two-stage, in the paper's table (R50).
PAPER_B4FPS_RATIO = {"0.1": 1.46, "0.2": 1.36, "0.3": 1.27, "0.4": 1.20, "0.5": 1.13}
THROUGHPUT_BASELINE = "configs/r50/deformable_detr_bbr_two_stage.yaml"
THROUGHPUT_CONFIGS = [f"configs/r50/sparse_detr_rho_{rho}.yaml" for rho in PAPER_B4FPS_RATIO]
# a model of the same variants small enough to run in seconds on a CPU (the dry run)
TINY_MODEL = "MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.RES2_OUT_CHANNELS 64 MODEL.SPARSE_DETR.HIDDEN_DIM 64 "
TINY_MODEL += "MODEL.SPARSE_DETR.NHEADS 2 MODEL.SPARSE_DETR.ENC_LAYERS 2 MODEL.SPARSE_DETR.DEC_LAYERS 1 "
TINY_MODEL += (
    "MODEL.SPARSE_DETR.DIM_FEEDFORWARD 64 MODEL.SPARSE_DETR.NUM_QUERIES 10 MODEL.SPARSE_DETR.NUM_DETECTIONS 10"
)
# both: no evaluation, the lr kept for every iteration, a checkpoint at the end only
TRAIN_OPTS = "DATASETS.TEST () TEST.EVAL_PERIOD 0 SOLVER.STEPS () SOLVER.CHECKPOINT_PERIOD 1000000 "
TRAIN_OPTS += "MODEL.SPARSE_DETR.NUM_CLASSES 4 SEED 0"

# what each step runs, on the GPU and in the dry run (the CPU, tiny sizes)
PLANS: Dict[str, Dict[str, Any]] = {
    "gpu": {
        "device": "cuda",
        "tests": ["tests/layers"],
        "bench_op": ["--targets", "cuda:float32,cuda:float16,cuda:bfloat16"],
        "throughput": ["--batch-sizes", "1", "4"],
        "model": [],
        "train": ["--config-file", "configs/r50/sparse_detr_rho_0.1.yaml"]
        + shlex.split(
            "SOLVER.AMP.ENABLED True SOLVER.MAX_ITER 100 DATASETS.TRAIN \"('synthetic_shapes_coco_size_train',)\""
        )
        # the paper's 2 images per GPU
        + shlex.split("SOLVER.IMS_PER_BATCH 2 SOLVER.REFERENCE_BATCH_SIZE 2 DATALOADER.NUM_WORKERS 4"),
        "env": {},
        "budget": 480,
    },
    "dry": {
        "device": "cpu",
        "tests": ["tests/layers/test_ms_deform_attn_op.py", "-k", "cuda"],
        "bench_op": shlex.split("--targets cpu:float32 --calls decoder --repeats 1 --warmup 0 --no-memory"),
        "throughput": shlex.split("--batch-sizes 1 2 --iters 1 --warmup 0 --input-size 64 96"),
        "model": shlex.split(TINY_MODEL),
        "train": ["--config-file", "configs/demo/sparse_detr_shapes_smoke.yaml"]
        + shlex.split("SOLVER.MAX_ITER 3 DATASETS.TRAIN \"('synthetic_shapes_mini_train',)\""),
        # tiny work: one intra-op thread, so that a busy machine's cores are not oversubscribed
        "env": {"OMP_NUM_THREADS": "1"},
        # only a stuck step should fail the dry run, not a slow machine
        "budget": 1200,
    },
}
# longest time each step may take, within the overall budget
STEP_CAPS = {"environment": 30, "install": 90, "build": 300, "tests": 120, "train": 180, "throughput": 180}
STEP_CAPS["bench_op"] = 150


class Run:
    """The steps' bookkeeping: logs in OUT, files in between in `scratch`, one record per step, the time budget."""

    def __init__(self, out: str, scratch: str, plan: Dict[str, Any], budget: float):
        self.out, self.scratch, self.plan = out, scratch, plan
        self.dry = plan["device"] == "cpu"
        self.deadline = time.monotonic() + budget
        self.step_deadline = self.deadline
        self.steps: List[Dict[str, Any]] = []
        self.results: Dict[str, Dict[str, Any]] = {}
        path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
        self.env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", **plan["env"])

    def scratch_file(self, name: str) -> str:
        return os.path.join(self.scratch, name)

    def command(self, log: str, cmd: List[str], env: Optional[Dict[str, str]] = None) -> int:
        """Runs `cmd` from the repository root, its output appended to OUT/<log>.log, within the step's time; returns
        its exit status (124 when it ran out of time: it is killed with whatever it started)."""
        timeout = max(self.step_deadline - time.monotonic(), 1)
        with open(os.path.join(self.out, f"{log}.log"), "a") as f:
            f.write(f"\n$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env={**self.env, **(env or {})},
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                f.write(f"\n[gpu_check] killed after {timeout:.0f} s\n")
                return 124

    def step(self, name: str, log: str, fn: Callable[[Dict[str, Any]], bool]) -> bool:
        """Runs fn(its record); records passed / failed (False or an exception) / not run (no time left)."""
        started = time.monotonic()
        self.step_deadline = min(self.deadline, started + STEP_CAPS[name])
        record: Dict[str, Any] = {"step": name, "log": f"{log}.log"}
        self.steps.append(record)
        if self.deadline - started < 5:
            record.update(status="not run", detail="the time budget was spent")
        else:
            try:
                record["status"] = "passed" if fn(self.results.setdefault(name, {})) else "failed"
            except Exception as e:  # a broken step must not hide the others' results
                record.update(status="failed", detail=f"{type(e).__name__}: {e}")
        record["seconds"] = round(time.monotonic() - started, 1)
        print(f"[gpu_check] {name}: {record['status']} ({record['seconds']} s)", flush=True)
        return record["status"] == "passed"

    def python(self, log: str, code: str) -> Dict[str, Any]:
        """What `code`, run by this Python, writes as JSON to the file named by its argument."""
        path = self.scratch_file("python.json")
        if self.command(log, [sys.executable, "-c", code, path]) != 0:
            raise RuntimeError(f"the Python snippet failed, see {log}.log")
        with open(path) as f:
            return json.load(f)

    def tool(self, log: str, script: str, args: List[str]) -> Optional[Dict[str, Any]]:
        """The JSON report of a projects/SparseDETR tool run with `args` (config overrides last), None if it failed."""
        path = self.scratch_file(f"{log}.json")
        if self.command(log, [sys.executable, os.path.join(TOOLS, script), "--json", path, *args]) != 0:
            return None
        with open(path) as f:
            return json.load(f)


ENVIRONMENT_CODE = """
import json, platform, sys, torch
d = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
     "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    d.update(gpu=p.name, gpus=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
             gpu_memory_gib=round(p.total_memory / 2**30, 1))
json.dump(d, open(sys.argv[1], "w"))
"""
EXTENSION_CODE = """
import json, sys
from sparse_detr import _C
json.dump({"compiled_with_cuda": _C.compiled_with_cuda()}, open(sys.argv[1], "w"))
"""


def environment(run: Run, record: Dict[str, Any]) -> bool:
    record.update(run.python("setup", ENVIRONMENT_CODE))
    for key, cmd in (
        ("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        ("nvcc", ["nvcc", "--version"]),
    ):
        try:
            lines = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        except (OSError, subprocess.TimeoutExpired):
            lines = []
        record[key] = lines[-1 if key == "nvcc" else 0] if lines else None
    with open(os.path.join(run.out, "setup.log"), "a") as f:
        f.write(json.dumps(record, indent=1) + "\n")
        if not (run.dry or record["cuda_available"]):
            f.write("[gpu_check] torch sees no GPU here: nothing to check (DRY_RUN=1 runs the steps on the CPU)\n")
    return run.dry or record["cuda_available"]


def install(run: Run, wheels: str) -> bool:
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": os.path.abspath(wheels), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    rc = run.command("setup", [sys.executable, "-m", "pip", "install", "-r", "requirements/gpu-check.txt"], offline)
    if rc == 0:
        rc = run.command("setup", ["bash", "scripts/install_detectron2.sh", sys.executable], offline)
    if rc != 0 and not os.path.isdir(wheels):
        with open(os.path.join(run.out, "setup.log"), "a") as f:
            f.write(f"[gpu_check] no folder {wheels}: run `make gpu-wheels` on a machine with network first\n")
    return rc == 0


def build(run: Run, environment_record: Dict[str, Any]) -> bool:
    if run.dry:
        try:
            run.python("setup", EXTENSION_CODE)
            return True  # the extension loads: kept as built
        except RuntimeError:
            pass
    env = {"MAX_JOBS": str(os.cpu_count() or 1)}
    if not run.dry:  # the CUDA kernels for this GPU only, and never left out silently
        env.update(TORCH_CUDA_ARCH_LIST=environment_record["capability"], FORCE_CUDA="1")
    if run.command("setup", [sys.executable, "setup.py", "build_ext", "--inplace"], env) != 0:
        return False
    return run.python("setup", EXTENSION_CODE)["compiled_with_cuda"] or run.dry


def tests(run: Run, record: Dict[str, Any]) -> bool:
    """pytest's own JUnit report: the counts, and the tests skipped for want of a GPU."""
    report = run.scratch_file("tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    rc = run.command("tests", cmd + run.plan["tests"])
    suite = ET.parse(report).getroot().find("testsuite")
    record["counts"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    skipped = [case.find("skipped") for case in suite.iter("testcase")]
    # on the GPU, a CUDA test skipped for want of one would hide exactly what this step is for
    record["skipped_for_want_of_a_gpu"] = sum(s is not None and "needs a GPU" in s.get("message", "") for s in skipped)
    return rc == 0 and (run.dry or record["skipped_for_want_of_a_gpu"] == 0)


def train(run: Run, record: Dict[str, Any]) -> bool:
    """train_net.py with a short schedule; what it logged to OUTPUT_DIR/metrics.json (detectron2's JSONWriter)."""
    out = run.scratch_file("train")
    opts = [*shlex.split(TRAIN_OPTS), "MODEL.DEVICE", run.plan["device"], "OUTPUT_DIR", out]
    env = {"SPARSE_DETR_DATASETS": run.scratch_file("datasets")}
    rc = run.command("train", [sys.executable, "train_net.py", *run.plan["train"], *opts], env)
    metrics = []
    if os.path.exists(os.path.join(out, "metrics.json")):
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = [m for m in map(json.loads, f) if "total_loss" in m]
    if metrics:
        losses = [m["total_loss"] for m in metrics]
        record.update(iterations=metrics[-1]["iteration"] + 1, loss_start=losses[0], loss_end=losses[-1])
        record["losses_finite"] = all(math.isfinite(v) for m in metrics for k, v in m.items() if k.startswith("loss"))
        times = [m["time"] for m in metrics if "time" in m]  # detectron2 leaves out the first iterations
        record["seconds_per_iteration"] = times[-1] if times else None
    # the trainer stops at the first non-finite loss or prediction (FloatingPointError): a zero exit means finite
    return rc == 0 and record.get("losses_finite", False)


def throughput(run: Run, record: Dict[str, Any]) -> bool:
    """Both precisions, then the speed-ups over the baseline beside the paper's."""
    args = ["--configs", *THROUGHPUT_CONFIGS, "--baseline", THROUGHPUT_BASELINE, *run.plan["throughput"]]
    model = ["MODEL.DEVICE", run.plan["device"], *run.plan["model"]]
    reports = {
        p: run.tool("throughput", "benchmark.py", args + flag + model) for p, flag in (("fp32", []), ("amp", ["--amp"]))
    }
    if None in reports.values():
        return False
    rows: Dict[str, Dict[str, Any]] = {}
    for precision, report in reports.items():
        for r in report["rows"]:
            rho = r["model"].partition("rho=")[2].rstrip(")")
            row = rows.setdefault(
                r["model"], {"model": r["model"], "paper B4FPS ratio": PAPER_B4FPS_RATIO.get(rho, 1.0)}
            )
            row.update({f"{precision} B{b} speed-up": s for b, s in r["speedup"].items()})
            row.update({f"{precision} B{b} s/img": t / int(b) for b, t in r["seconds_per_batch"].items()})
    record.update(rows=list(rows.values()), conditions={p: r["header"] for p, r in reports.items()})
    record["tables"] = {p: r["table"] for p, r in reports.items()}
    return True


def bench_op(run: Run, record: Dict[str, Any]) -> bool:
    report = run.tool("bench_op", "bench_op.py", run.plan["bench_op"])
    if report is not None:
        record.update(report)
    return report is not None


def summary_markdown(run: Run) -> str:
    env, results = run.results.get("environment", {}), run.results
    lines = ["# GPU check" + (" (dry run: CPU, tiny sizes)" if run.dry else ""), ""]
    keys = ("gpu", "driver", "torch", "torch_cuda", "nvcc", "python", "capability", "gpu_memory_gib")
    lines += [f"- {k}: {env[k]}" for k in keys if k in env]
    lines += ["", "| step | status | seconds | log |", "|---|---|---:|---|"]
    lines += [f"| {s['step']} | {s['status']}{': ' + s.get('detail', '') if 'detail' in s else ''} | "
              f"{s['seconds']} | {s['log']} |" for s in run.steps]  # fmt: skip
    if results.get("tests", {}).get("counts"):
        lines += ["", "## Tests", "", ", ".join(f"{n} {k}" for k, n in results["tests"]["counts"].items())]
    if results.get("train", {}).get("iterations"):
        lines += ["", "## Training", "", *(f"- {k}: {v}" for k, v in results["train"].items())]
    for precision, table in results.get("throughput", {}).get("tables", {}).items():
        lines += ["", f"## Throughput ({precision}, benchmark.py)", "", results["throughput"]["conditions"][precision]]
        lines += ["", table]
    if "rows" in results.get("throughput", {}):
        lines += ["", "| model | speed-ups over the baseline | paper B4FPS ratio |", "|---|---|---:|"]
        for row in results["throughput"]["rows"]:
            speedups = ", ".join(f"{k.replace(' speed-up', '')} {v:.2f}x" for k, v in row.items() if "speed-up" in k)
            lines.append(f"| {row['model']} | {speedups} | {row['paper B4FPS ratio']:.2f}x |")
    if results.get("bench_op", {}).get("table"):
        lines += ["", "## bench_op: the op against the grid_sample reference", "", results["bench_op"]["header"]]
        lines += ["", results["bench_op"]["table"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See the module docstring.")
    parser.add_argument("out", help="folder for the logs and the summary (created; at most 8 files)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny sizes")
    parser.add_argument("--wheels", default=os.path.join(REPO, ".whl"), help="folder `make gpu-wheels` filled")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default: 480, dry run 1200)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    plan = PLANS["dry" if args.dry_run else "gpu"]
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        run = Run(args.out, scratch, plan, plan["budget"] if args.budget is None else args.budget)
        ready = (
            run.step("environment", "setup", lambda r: environment(run, r))
            and run.step("install", "setup", lambda r: install(run, args.wheels))
            and run.step("build", "setup", lambda r: build(run, run.results["environment"]))
        )
        if ready:  # correctness first, so that a run short of time drops timings rather than checks
            run.step("tests", "tests", lambda r: tests(run, r))
            run.step("train", "train", lambda r: train(run, r))
            run.step("throughput", "throughput", lambda r: throughput(run, r))
            run.step("bench_op", "bench_op", lambda r: bench_op(run, r))
    passed = ready and all(s["status"] == "passed" for s in run.steps)
    summary = {"dry_run": run.dry, "passed": passed, "seconds": round(time.monotonic() - start, 1)}
    summary.update(steps=run.steps, **run.results)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary_markdown(run))
    print(f"[gpu_check] {'passed' if passed else 'FAILED'} in {summary['seconds']} s; see {args.out}/summary.md")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
