#!/usr/bin/env python3
"""`make gpu-check OUT=<folder>`: everything this project runs on a GPU, checked in one go on a machine with one.

Steps, each logged, and all of it summed up in summary.md and summary.json (at most 8 files in OUT):
  environment  the GPU, its driver, torch, CUDA and nvcc versions;
  install      what requirements/gpu-check.txt and detectron2 need, from the wheels `make gpu-wheels` prepared
               (--wheels), offline: pip skips whatever the machine already has;
  build        the extension with its CUDA kernels, for the GPU present, against the torch found there;
  tests        tests/layers with the CUDA tests: CUDA kernels against the CPU kernel in float64, float16 and
               bfloat16 within tolerances, gradcheck, the CUDA kernels against their host harness;
  train        100 AMP iterations of R50 Sparse DETR rho = 0.1 on the synthetic shapes at COCO's size: loss at the
               start and the end, whether every value stayed finite, seconds per iteration, peak GPU memory;
  throughput   projects/SparseDETR/benchmark.py, Sparse DETR rho = 0.1 ... 0.5 against Deformable DETR + box
               refinement + two-stage, batch 1 and 4, float32 and AMP, beside the paper's B4FPS ratios;
  bench_op     projects/SparseDETR/bench_op.py, the op against the grid_sample reference, CUDA, float32, float16
               and bfloat16, at encoder, sparse-encoder and decoder sizes.

A step that fails is recorded and the next one runs, except that nothing runs after a failed install or build.
The whole run keeps within --budget seconds (480: 8 minutes): a step gets what is left of it, at most its own cap
(STEP_CAPS).
Exit status 0 when every step passed.

--dry-run runs the same steps on the CPU with tiny sizes (the build is kept when the extension already loads), so
a test can call it: tests/test_gpu_check.py.

Only the standard library is imported here: the install step comes first. Run with the Python to check (`python3`
on the GPU machine; that is the one packages are installed into).
"""

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARK = os.path.join(REPO, "projects", "SparseDETR", "benchmark.py")
BENCH_OP = os.path.join(REPO, "projects", "SparseDETR", "bench_op.py")

# Sparse DETR's B4FPS over that of Deformable DETR + BBR + two-stage, in the paper's table (R50).
PAPER_B4FPS_RATIO = {0.1: 1.46, 0.2: 1.36, 0.3: 1.27, 0.4: 1.20, 0.5: 1.13}
THROUGHPUT_BASELINE = "configs/r50/deformable_detr_bbr_two_stage.yaml"
THROUGHPUT_CONFIGS = [f"configs/r50/sparse_detr_rho_{rho}.yaml" for rho in PAPER_B4FPS_RATIO]

# A model of the same variants small enough to run in seconds on a CPU (the dry run's "tiny sizes").
TINY_MODEL = [
    "MODEL.RESNETS.DEPTH",
    "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "64",
    "MODEL.SPARSE_DETR.HIDDEN_DIM",
    "64",
    "MODEL.SPARSE_DETR.NHEADS",
    "2",
    "MODEL.SPARSE_DETR.ENC_LAYERS",
    "2",
    "MODEL.SPARSE_DETR.DEC_LAYERS",
    "1",
    "MODEL.SPARSE_DETR.DIM_FEEDFORWARD",
    "64",
    "MODEL.SPARSE_DETR.NUM_QUERIES",
    "10",
    "MODEL.SPARSE_DETR.NUM_DETECTIONS",
    "10",
]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the steps run: the GPU check itself, or its dry run on the CPU."""

    device: str
    test_args: List[str]
    bench_op_args: List[str]
    throughput_args: List[str]
    model_opts: List[str]  # config overrides of the throughput step's models
    batch_sizes: List[int]
    train_config: str
    train_opts: List[str]
    env: Dict[str, str]  # for every command
    budget: float  # seconds for the whole run

    @property
    def dry(self) -> bool:
        return self.device == "cpu"


GPU = Plan(
    device="cuda",
    test_args=["tests/layers"],
    bench_op_args=["--targets", "cuda:float32,cuda:float16,cuda:bfloat16"],
    throughput_args=[],
    model_opts=[],
    batch_sizes=[1, 4],
    train_config="configs/r50/sparse_detr_rho_0.1.yaml",
    train_opts=[
        "SOLVER.AMP.ENABLED",
        "True",
        "SOLVER.MAX_ITER",
        "100",
        "DATASETS.TRAIN",
        "('synthetic_shapes_coco_size_train',)",
        # The paper's 2 images per GPU.
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.REFERENCE_BATCH_SIZE",
        "2",
        "DATALOADER.NUM_WORKERS",
        "4",
    ],
    env={},
    budget=480,
)
DRY_RUN = Plan(
    device="cpu",
    test_args=["tests/layers/test_ms_deform_attn_op.py", "-k", "cuda"],
    bench_op_args=["--targets", "cpu:float32", "--calls", "decoder", "--repeats", "1", "--warmup", "0"],
    throughput_args=["--iters", "1", "--warmup", "0", "--input-size", "64", "96"],
    model_opts=TINY_MODEL,
    batch_sizes=[1, 2],
    train_config="configs/demo/sparse_detr_shapes_smoke.yaml",
    train_opts=["SOLVER.MAX_ITER", "3", "DATASETS.TRAIN", "('synthetic_shapes_mini_train',)"],
    # Tiny work: one intra-op thread, so that the cores of a busy machine are not oversubscribed (OpenMP threads
    # waiting for each other can stall a step for seconds).
    env={"OMP_NUM_THREADS": "1"},
    # Only a stuck step should fail the dry run, not a slow machine.
    budget=1200,
)
# Both: no evaluation, the lr kept for all iterations, a checkpoint at the end only.
TRAIN_OPTS = [
    "DATASETS.TEST",
    "()",
    "TEST.EVAL_PERIOD",
    "0",
    "SOLVER.STEPS",
    "()",
    "SOLVER.CHECKPOINT_PERIOD",
    "1000000",
    "MODEL.SPARSE_DETR.NUM_CLASSES",
    "4",
    "SEED",
    "0",
]

# Longest time each step may take on the GPU machine, within the overall budget.
STEP_CAPS = {
    "environment": 30,
    "install": 90,
    "build": 300,
    "tests": 120,
    "bench_op": 150,
    "throughput": 180,
    "train": 180,
}


class Run:
    """The steps' bookkeeping: logs in OUT, files in between in `scratch`, one record per step, the time budget."""

    def __init__(self, out: str, scratch: str, plan: Plan, budget: float, python: str):
        self.out, self.scratch, self.plan, self.python = out, scratch, plan, python
        self.deadline = time.monotonic() + budget
        self.step_deadline = self.deadline
        self.steps: List[Dict[str, Any]] = []
        self.env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
            **plan.env,
        )

    def log_path(self, name: str) -> str:
        return os.path.join(self.out, f"{name}.log")

    def command(self, log: str, cmd: Sequence[str], env: Optional[Dict[str, str]] = None) -> int:
        """Runs `cmd` from the repository root with its output appended to OUT/<log>.log, within the step's time;
        returns its exit status (124 when it ran out of time)."""
        timeout = self.step_deadline - time.monotonic()
        with open(self.log_path(log), "a") as f:
            f.write(f"\n$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(
                list(cmd),
                cwd=REPO,
                env={**self.env, **(env or {})},
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                return proc.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the command and whatever it started (workers, children)
                proc.wait()
                f.write(f"\n[gpu_check] killed after {timeout:.0f} s\n")
                return 124

    def step(self, name: str, log: str, fn) -> bool:
        """Runs fn(); records passed / failed (fn returned False or raised) / not run (no time left)."""
        started = time.monotonic()
        self.step_deadline = min(self.deadline, started + STEP_CAPS[name])
        record: Dict[str, Any] = {"step": name, "log": f"{log}.log"}
        self.steps.append(record)
        if self.deadline - started < 5:
            record.update(status="not run", detail="the time budget was spent")
        else:
            try:
                ok = fn()
                record["status"] = "passed" if ok else "failed"
            except Exception as e:  # a broken step must not hide the others' results
                record.update(status="failed", detail=f"{type(e).__name__}: {e}")
                with open(self.log_path(log), "a") as f:
                    f.write(f"\n[gpu_check] {name}: {type(e).__name__}: {e}\n")
        record["seconds"] = round(time.monotonic() - started, 1)
        print(f"[gpu_check] {name}: {record['status']} ({record['seconds']} s)", flush=True)
        return record["status"] == "passed"


def python_json(run: Run, log: str, code: str) -> Dict[str, Any]:
    """The JSON that `code` writes to the file named by its argument, run by the Python under check."""
    path = os.path.join(run.scratch, "python.json")
    rc = run.command(log, [run.python, "-c", code, path])
    if rc != 0:
        raise RuntimeError(f"exit status {rc}")
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


def environment(run: Run, record: Dict[str, Any]) -> bool:
    record.update(python_json(run, "setup", ENVIRONMENT_CODE))
    for key, cmd in (
        ("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        ("nvcc", ["nvcc", "--version"]),
    ):
        try:
            text = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            text = ""
        if key == "nvcc":
            text = (re.findall(r"release [^\s,]+", text) or [""])[0]
        record[key] = text.splitlines()[0] if text else None
    with open(run.log_path("setup"), "a") as f:
        f.write(json.dumps(record, indent=1) + "\n")
        if not (run.plan.dry or record["cuda_available"]):
            f.write("[gpu_check] torch sees no GPU here: nothing to check (DRY_RUN=1 runs the steps on the CPU)\n")
    return run.plan.dry or record["cuda_available"]


def install(run: Run, wheels: str) -> bool:
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": os.path.abspath(wheels), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    rc = run.command("setup", [run.python, "-m", "pip", "install", "-r", "requirements/gpu-check.txt"], env=offline)
    if rc == 0:
        rc = run.command("setup", ["bash", "scripts/install_detectron2.sh", run.python], env=offline)
    if rc != 0 and not os.path.isdir(wheels):
        with open(run.log_path("setup"), "a") as f:
            f.write(f"[gpu_check] no folder {wheels}: run `make gpu-wheels` on a machine with network first\n")
    return rc == 0


EXTENSION_CODE = """
import json, sys
from sparse_detr import _C
json.dump({"compiled_with_cuda": _C.compiled_with_cuda()}, open(sys.argv[1], "w"))
"""


def build(run: Run, environment_record: Dict[str, Any]) -> bool:
    if run.plan.dry:
        try:
            python_json(run, "setup", EXTENSION_CODE)
            with open(run.log_path("setup"), "a") as f:
                f.write("[gpu_check] dry run: the extension loads, kept as built\n")
            return True
        except RuntimeError:
            pass  # not built yet
    env = {"MAX_JOBS": str(os.cpu_count() or 1)}
    if not run.plan.dry:
        # The CUDA kernels for this GPU only; FORCE_CUDA so that they are never left out silently.
        env.update(TORCH_CUDA_ARCH_LIST=environment_record["capability"], FORCE_CUDA="1")
    if run.command("setup", [run.python, "setup.py", "build_ext", "--inplace"], env=env) != 0:
        return False
    return python_json(run, "setup", EXTENSION_CODE)["compiled_with_cuda"] or run.plan.dry


def tests(run: Run, record: Dict[str, Any]) -> bool:
    rc = run.command("tests", [run.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *run.plan.test_args])
    with open(run.log_path("tests")) as f:
        text = f.read()
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text.splitlines()[-1] if text else "")
    record["counts"] = {kind: int(n) for n, kind in counts}
    # On the GPU, a CUDA test skipped for want of a GPU would hide exactly what this step is for.
    record["skipped_for_want_of_a_gpu"] = sum(int(n) for n in re.findall(r"SKIPPED \[(\d+)\].*needs a GPU", text))
    return rc == 0 and (run.plan.dry or record["skipped_for_want_of_a_gpu"] == 0)


def bench_op(run: Run, record: Dict[str, Any]) -> bool:
    path = os.path.join(run.scratch, "bench_op.json")
    rc = run.command("bench_op", [run.python, BENCH_OP, *run.plan.bench_op_args, "--json", path])
    if rc != 0:
        return False
    with open(path) as f:
        record["rows"] = json.load(f)
    with open(run.log_path("bench_op")) as f:
        record["table"] = [line for line in f.read().splitlines() if line.startswith("|")]
    return True


def throughput(run: Run, record: Dict[str, Any]) -> bool:
    """Both precisions, then the table of speed-ups over the baseline beside the paper's."""
    measured = {}
    for precision, flag in (("fp32", []), ("amp", ["--amp"])):
        path = os.path.join(run.scratch, f"throughput_{precision}.json")
        cmd = [
            run.python,
            BENCHMARK,
            "--configs",
            *THROUGHPUT_CONFIGS,
            "--baseline",
            THROUGHPUT_BASELINE,
            "--batch-sizes",
            *map(str, run.plan.batch_sizes),
            "--json",
            path,
            *flag,
            *run.plan.throughput_args,
            "MODEL.DEVICE",
            run.plan.device,
            *run.plan.model_opts,
        ]
        if run.command("throughput", cmd) != 0:
            return False
        with open(path) as f:
            measured[precision] = json.load(f)
    record.update(throughput_table(measured, run.plan.batch_sizes))
    record["conditions"] = {precision: result["header"] for precision, result in measured.items()}
    return True


def throughput_table(measured: Dict[str, Dict[str, Any]], batch_sizes: List[int]) -> Dict[str, Any]:
    """Per model: seconds per image and speed-up over the baseline for each precision and batch size, the paper's
    B4FPS ratio beside them; as rows and as a markdown table."""
    columns = [(p, b) for p in measured for b in batch_sizes]
    rows: Dict[str, Dict[str, Any]] = {}
    for precision, result in measured.items():
        base = next(r for r in result["rows"] if r["config"] == result["baseline"])["seconds_per_batch"]
        for r in result["rows"]:
            rho = re.search(r"rho=([\d.]+)", r["model"])
            ratio = PAPER_B4FPS_RATIO.get(float(rho.group(1))) if rho else 1.0
            row = rows.setdefault(r["model"], {"model": r["model"], "paper B4FPS ratio": ratio})
            for b in batch_sizes:
                t = r["seconds_per_batch"][str(b)]  # JSON keys are strings
                row[f"{precision} B{b} s/img"] = t / b
                row[f"{precision} B{b} speed-up"] = base[str(b)] / t
    header = [
        "model",
        *(f"{p} B{b} s/img" for p, b in columns),
        *(f"{p} B{b} speed-up" for p, b in columns),
        "paper B4FPS ratio",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for row in rows.values():
        cells = [
            row["model"],
            *(f"{row[f'{p} B{b} s/img']:.3f}" for p, b in columns),
            *(f"{row[f'{p} B{b} speed-up']:.2f}x" for p, b in columns),
            "" if row["paper B4FPS ratio"] is None else f"{row['paper B4FPS ratio']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return {"rows": list(rows.values()), "table": lines}


def train(run: Run, record: Dict[str, Any]) -> bool:
    path = os.path.join(run.scratch, "train.json")
    opts = [
        *run.plan.train_opts,
        *TRAIN_OPTS,
        "MODEL.DEVICE",
        run.plan.device,
        "OUTPUT_DIR",
        os.path.join(run.scratch, "train"),
    ]
    rc = run.command(
        "train",
        [run.python, os.path.abspath(__file__), "--train-step", path, "--config-file", run.plan.train_config, *opts],
        env={"SPARSE_DETR_DATASETS": os.path.join(run.scratch, "datasets")},
    )
    if os.path.exists(path):  # written after a failed training too
        with open(path) as f:
            record.update(json.load(f))
    return rc == 0 and record["all_finite"]


def train_step(result_path: str, argv: List[str]) -> None:
    """In a process of its own: train_net.py's training with a hook that records every iteration's losses."""
    sys.path.insert(0, REPO)
    import torch
    from detectron2.engine import HookBase, default_argument_parser

    import train_net
    from sparse_detr.engine import Trainer

    class Record(HookBase):
        """Runs after training, also after training failed (detectron2 calls after_train in a `finally`): the
        record then tells how far it got."""

        def after_train(self):
            histories = self.trainer.storage.histories()
            losses = {
                k: [v for v, _ in h.values()]
                for k, h in histories.items()
                if k == "total_loss" or k.startswith("loss_")
            }
            times = [v for v, _ in histories["time"].values()] if "time" in histories else []
            total = losses.get("total_loss", [])
            finite_params = all(bool(torch.isfinite(p).all()) for p in self.trainer.model.parameters())
            result = {
                "iterations": len(total),
                "loss_start": total[0] if total else None,
                "loss_end": total[-1] if total else None,
                "loss_first_10_mean": statistics.fmean(total[:10]) if total else None,
                "loss_last_10_mean": statistics.fmean(total[-10:]) if total else None,
                "losses_finite": all(math.isfinite(v) for vs in losses.values() for v in vs),
                "parameters_finite": finite_params,
                # detectron2's IterationTimer leaves out the first iterations (warm-up).
                "seconds_per_iteration_median": statistics.median(times) if times else None,
                "seconds_per_iteration_mean": statistics.fmean(times) if times else None,
                "images_per_iteration": self.trainer.cfg.SOLVER.IMS_PER_BATCH,
            }
            result["all_finite"] = result["losses_finite"] and finite_params
            if torch.cuda.is_available():
                result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                result["peak_gpu_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            scaler = getattr(self.trainer._trainer, "grad_scaler", None)
            if scaler is not None:
                result["amp_final_loss_scale"] = scaler.get_scale()
            with open(result_path, "w") as f:
                json.dump(result, f, indent=1)

    args = default_argument_parser().parse_args(argv)
    cfg = train_net.setup(args)
    trainer = Trainer(cfg)
    trainer.register_hooks([Record()])
    trainer.resume_or_load(resume=False)
    trainer.train()


def summary_markdown(dry: bool, env: Dict[str, Any], steps: List[Dict[str, Any]], results: Dict[str, Any]) -> str:
    title = "# GPU check" + (" (dry run: CPU, tiny sizes)" if dry else "")
    lines = [title, ""]
    lines += [
        f"- {k}: {env.get(k)}"
        for k in ("gpu", "driver", "torch", "torch_cuda", "nvcc", "python", "capability", "gpu_memory_gib")
        if k in env
    ]
    lines += ["", "| step | status | seconds | log |", "|---|---|---:|---|"]
    lines += [
        f"| {s['step']} | {s['status']}{': ' + s['detail'] if 'detail' in s else ''} | {s['seconds']} | {s['log']} |"
        for s in steps
    ]
    tests_ = results.get("tests", {})
    if tests_.get("counts"):
        lines += ["", "## Tests", "", ", ".join(f"{n} {k}" for k, n in tests_["counts"].items())]
    if results.get("bench_op", {}).get("table"):
        lines += ["", "## bench_op: the op against the grid_sample reference", "", *results["bench_op"]["table"]]
    if results.get("throughput", {}).get("table"):
        lines += [
            "",
            "## Throughput (benchmark.py): speed-up over Deformable DETR + BBR + two-stage",
            "",
            *results["throughput"]["table"],
            "",
        ]
        lines += [f"- {p}: {header}" for p, header in results["throughput"]["conditions"].items()]
    if "loss_start" in results.get("train", {}):
        t = results["train"]
        lines += ["", "## Training", ""]
        lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in t.items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See the module docstring.")
    parser.add_argument("out", help="folder for the logs and the summary (created; at most 8 files)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny sizes")
    parser.add_argument("--wheels", default=os.path.join(REPO, ".whl"), help="folder `make gpu-wheels` filled")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default: 480, dry run 1200)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--train-step"]:  # --train-step RESULT_JSON train_net.py's arguments...
        train_step(argv[1], argv[2:])
        return 0
    args = parser.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    results: Dict[str, Dict[str, Any]] = {
        name: {} for name in ("environment", "tests", "bench_op", "throughput", "train")
    }
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        plan = DRY_RUN if args.dry_run else GPU
        run = Run(args.out, scratch, plan, plan.budget if args.budget is None else args.budget, sys.executable)
        ready = (
            run.step("environment", "setup", lambda: environment(run, results["environment"]))
            and run.step("install", "setup", lambda: install(run, args.wheels))
            and run.step("build", "setup", lambda: build(run, results["environment"]))
        )
        if ready:
            # Correctness first, so that a run short of time drops timings rather than checks.
            run.step("tests", "tests", lambda: tests(run, results["tests"]))
            run.step("train", "train", lambda: train(run, results["train"]))
            run.step("throughput", "throughput", lambda: throughput(run, results["throughput"]))
            run.step("bench_op", "bench_op", lambda: bench_op(run, results["bench_op"]))
    passed = ready and all(s["status"] == "passed" for s in run.steps)
    summary = {
        "dry_run": run.plan.dry,
        "passed": passed,
        "seconds": round(time.monotonic() - start, 1),
        "steps": run.steps,
        **results,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary_markdown(run.plan.dry, results["environment"], run.steps, results))
    print(f"[gpu_check] {'passed' if passed else 'FAILED'} in {summary['seconds']} s; see {args.out}/summary.md")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
