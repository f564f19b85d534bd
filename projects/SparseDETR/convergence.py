#!/usr/bin/env python
"""Convergence of Sparse DETR with the training switches beyond the paper: every variant trained from scratch on the
same data with the same schedule, its COCO AP at two points of that schedule, and the time of its training step.

Variants (MODEL.SPARSE_DETR switches on top of ``--config-file``, by default the demo: configs/demo/
sparse_detr_shapes.yaml, Sparse DETR rho = 0.3 on the generated synthetic shapes, 1,500 iterations):

  dam         the paper's: the scoring network learns the decoder-attention map (DAM)
  foreground  Focus-DETR's foreground target instead (weight 1.5)
  salience    Salience-DETR's salience target instead (weight 2.0)
  dam_dn      the paper's, plus DINO's contrastive denoising queries
  recipe      foreground + denoising + mixed query selection + look-forward-twice
              (configs/demo/sparse_detr_fg_dn_shapes.yaml)

Each run is ``train_net.py`` in a process of its own, in ``OUTPUT/<variant>_seed<seed>`` (log in ``stdout.log``),
evaluated every ``--eval-period`` iterations and at the end; the table shows the first and the last evaluation. The
runs go seed by seed (every variant of the first seed, then of the next). A run whose folder already holds its last
evaluation is read, not run again: an interrupted table goes on where it stopped (``--rerun`` trains again).
Then every variant's training step (forward, backward, AdamW step on one batch of the training data, the same batch
for all) is timed with the variants taking turns (sparse_detr.measure), which gives the cost of each switch and,
dam against foreground, what skipping the DAM saves.

Examples:
  python projects/SparseDETR/convergence.py --json output/convergence/table.json          # the table (hours)
  python projects/SparseDETR/convergence.py --variants dam recipe --seeds 42 --max-iter 40 --eval-period 20
  python projects/SparseDETR/convergence.py --skip-training --variants dam foreground \\
      --config-file configs/r50/sparse_detr_rho_0.1.yaml DATASETS.TRAIN "('synthetic_shapes_train',)" \\
      MODEL.SPARSE_DETR.NUM_CLASSES 4 SOLVER.IMS_PER_BATCH 2 SOLVER.REFERENCE_BATCH_SIZE 2   # R50-size steps
"""

import argparse
import json
import os

# As train_net.py: OpenMP threads that spin while they wait stall each other on busy cores; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch  # noqa: E402
from detectron2.config import CfgNode  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from sparse_detr import setup_cfg  # noqa: E402
from sparse_detr.data.build import build_detr_train_loader  # noqa: E402
from sparse_detr.engine import build_optimizer  # noqa: E402
from sparse_detr.measure import Report, Timings, check_rounds, describe_device, interleaved_times  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = "configs/demo/sparse_detr_shapes.yaml"

_FOREGROUND = ["MODEL.SPARSE_DETR.SCORE_TARGET", "foreground", "MODEL.SPARSE_DETR.MASK_PREDICTION_COEF", "1.5"]
_DN = ["MODEL.SPARSE_DETR.DN.ENABLED", "True"]
# name: (what it is, its overrides of the base config)
VARIANTS: Dict[str, Tuple[str, List[str]]] = {
    "dam": ("DAM target (the paper's)", []),
    "foreground": ("foreground target", _FOREGROUND),
    "salience": (
        "salience target",
        ["MODEL.SPARSE_DETR.SCORE_TARGET", "salience", "MODEL.SPARSE_DETR.MASK_PREDICTION_COEF", "2.0"],
    ),
    "dam_dn": ("DAM + denoising", _DN),
    "recipe": (
        "foreground + denoising + mixed query selection + look-forward-twice",
        _FOREGROUND
        + _DN
        + ["MODEL.SPARSE_DETR.EFF_QUERY_INIT", "False", "MODEL.SPARSE_DETR.MIXED_QUERY_SELECTION", "True"]
        + ["MODEL.SPARSE_DETR.LOOK_FORWARD_TWICE", "True"],
    ),
}


def resolve_config_path(path: str) -> str:
    """A config path as given, else relative to the repository (so the defaults work from any directory)."""
    for candidate in (path, str(REPO / path)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"config file not found: {path}")


def schedule(cfg: CfgNode, max_iter: int, eval_period: int) -> List[str]:
    """Overrides that run ``cfg``'s schedule in ``max_iter`` iterations (lr steps scaled alike), evaluated every
    ``eval_period`` and at the end, with only the final checkpoint."""
    if max_iter < 1 or not 0 < eval_period <= max_iter:
        raise ValueError(f"need max_iter >= 1 and 0 < eval_period <= max_iter, got {max_iter} and {eval_period}")
    steps = tuple(round(s * max_iter / cfg.SOLVER.MAX_ITER) for s in cfg.SOLVER.STEPS)
    return [
        *("SOLVER.MAX_ITER", str(max_iter)),
        *("SOLVER.STEPS", str(tuple(s for s in steps if 0 < s < max_iter))),
        *("SOLVER.CHECKPOINT_PERIOD", str(max_iter)),
        *("TEST.EVAL_PERIOD", str(eval_period)),
    ]


def read_run(output_dir: Path, max_iter: int) -> Optional[Dict[str, Any]]:
    """What a finished run logged in its ``metrics.json``: ``evaluations`` {iteration (1-based): {"AP", "AP50"}}
    and ``seconds_per_iter`` (the median of the logged iteration times, each a median over 20 iterations, the
    first window left out: it holds the start-up); None unless the run reached its last evaluation."""
    path = output_dir / "metrics.json"
    if not path.is_file():
        return None
    evaluations, times = {}, []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "bbox/AP" in record:
            # detectron2 logs a periodic evaluation at its last iteration (0-based), the final one after training,
            # at max_iter: both are "after this many iterations"
            done = min(record["iteration"] + 1, max_iter)
            evaluations[done] = {"AP": record["bbox/AP"], "AP50": record["bbox/AP50"]}
        if "time" in record:
            times.append(record["time"])
    if max_iter not in evaluations:
        return None
    return {"evaluations": evaluations, "seconds_per_iter": statistics.median(times[1:] or times)}


def train(config: str, overrides: Sequence[str], output_dir: Path) -> None:
    """``train_net.py`` on ``config`` with ``overrides`` into ``output_dir``, in a process of its own."""
    output_dir.mkdir(parents=True, exist_ok=True)
    # detectron2 appends to metrics.json: an unfinished earlier try would mix into this run's figures
    (output_dir / "metrics.json").unlink(missing_ok=True)
    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", config, *overrides]
    cmd += ["OUTPUT_DIR", str(output_dir)]
    with open(output_dir / "stdout.log", "w") as log:
        done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"training failed (exit {done.returncode}): {' '.join(cmd)}; see {output_dir}/stdout.log")


def step_times(
    config: str, variants: Sequence[str], opts: Sequence[str], warmup: int, rounds: int
) -> Tuple[Timings, Timings]:
    """Seconds of one training step of every variant, and of its scoring network's loss alone (the target built
    from the decoder attention or from the boxes, and the loss), the variants taking turns
    (:func:`interleaved_times`), all on the first batch of the config's training data. The loss alone is short: it
    gets 10 times the rounds, on the outputs of a training forward of its model."""
    cfgs = {v: setup_cfg(config, [*VARIANTS[v][1], *opts, "DATALOADER.NUM_WORKERS", "0"]) for v in variants}
    first = cfgs[variants[0]]
    batch = next(iter(build_detr_train_loader(first)))
    steps, score_losses = {}, {}
    for name, cfg in cfgs.items():
        torch.manual_seed(first.SEED)
        model = build_model(cfg).train()
        optimizer = build_optimizer(cfg, model)

        def step(model=model, optimizer=optimizer):
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()

        steps[name] = step
        criterion_inputs = []
        hook = model.criterion.register_forward_pre_hook(lambda module, args, seen=criterion_inputs: seen.append(args))
        with torch.no_grad():
            model(batch)
        hook.remove()
        score_losses[name] = partial(model.criterion.loss_token_scores, *criterion_inputs[0])
    device = torch.device(first.MODEL.DEVICE)
    return interleaved_times(steps, warmup, rounds, device), interleaved_times(
        score_losses, warmup, 10 * rounds, device
    )


def _cell(values: Sequence[float]) -> str:
    """Mean over the seeds, and each seed's value."""
    if not values:
        return "—"
    mean = statistics.mean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ({', '.join(f'{v:.1f}' for v in values)})"


def run(
    config: str = DEFAULT_CONFIG,
    variants: Sequence[str] = tuple(VARIANTS),
    seeds: Sequence[int] = (42, 43),
    max_iter: int = 0,
    eval_period: int = 0,
    output: str = "output/convergence",
    opts: Sequence[str] = (),
    skip_training: bool = False,
    rerun: bool = False,
    step_warmup: int = 2,
    step_rounds: int = 10,
) -> Report:
    """Trains (unless ``skip_training``) and times every variant; see the module docstring. ``max_iter`` 0: the
    config's; ``eval_period`` 0: 2/5 of ``max_iter`` (600 of the demo's 1,500)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"--variants: {unknown or 'none given'}; choose from {list(VARIANTS)}")
    if step_rounds:
        check_rounds(step_warmup, step_rounds)
    config = resolve_config_path(config)
    base = setup_cfg(config, opts)
    max_iter = max_iter or base.SOLVER.MAX_ITER
    eval_period = eval_period or max(1, round(max_iter * 0.4))
    plan = schedule(base, max_iter, eval_period)
    first_eval = min(eval_period, max_iter)

    rows = {v: {"variant": v, "switches": VARIANTS[v][0], "runs": {}} for v in variants}
    if not skip_training:
        # seed by seed: an interrupted table has every variant of the first seeds
        for seed in seeds:
            for variant in variants:
                out_dir = Path(output) / f"{variant}_seed{seed}"
                result = None if rerun else read_run(out_dir, max_iter)
                if result is None:
                    print(
                        f"[convergence] training {variant}, seed {seed}, {max_iter} iterations -> {out_dir}", flush=True
                    )
                    train(config, [*VARIANTS[variant][1], *opts, "SEED", str(seed), *plan], out_dir)
                    result = read_run(out_dir, max_iter)
                    if result is None:
                        raise RuntimeError(f"{out_dir}/metrics.json has no evaluation at iteration {max_iter}")
                rows[variant]["runs"][seed] = result
                print(f"[convergence] {variant}, seed {seed}: {json.dumps(result['evaluations'])}", flush=True)

    timings, score_timings = (
        step_times(config, variants, opts, step_warmup, step_rounds) if step_rounds else (None,) * 2
    )
    columns = ["variant", "switches"]
    if not skip_training:
        columns += [f"{m} @{i}" for i in (first_eval, max_iter) for m in ("AP", "AP50")] + ["s/iter (runs)"]
    if timings is not None:
        columns += ["step s (interleaved)", "step time / dam's", "scoring loss ms", "scoring loss / dam step"]
    for variant, row in rows.items():
        runs = list(row["runs"].values())
        if not skip_training:
            for i in (first_eval, max_iter):
                for metric in ("AP", "AP50"):
                    row[f"{metric} @{i}"] = _cell([r["evaluations"][i][metric] for r in runs])
            row["s/iter (runs)"] = f"{statistics.median([r['seconds_per_iter'] for r in runs]):.3f}"
        if timings is not None:
            row["step_seconds"] = timings.seconds[variant]
            row["step s (interleaved)"] = f"{timings.median(variant):.3f}"
            row["step time / dam's"] = f"{timings.speedup(variant, 'dam'):.3f}" if "dam" in rows else "—"
            row["score_loss_seconds"] = score_timings.seconds[variant]
            row["scoring loss ms"] = f"{1000 * score_timings.median(variant):.2f}"
            reference_step = timings.median("dam" if "dam" in rows else variant)
            row["scoring loss / dam step"] = f"{100 * score_timings.median(variant) / reference_step:.2f} %"
    header = f"{os.path.relpath(config, REPO)} {' '.join(opts)}".strip()
    if not skip_training:
        header += f"; seeds {list(seeds)}; {max_iter} iterations, evaluated every {eval_period} and at the end"
    if timings is not None:
        header += (
            f"; step times: {describe_device(torch.device(base.MODEL.DEVICE))}, median of {step_rounds} rounds after "
            f"{step_warmup} warm-up, variants interleaved on one batch (time / dam's: the median per-round ratio); "
            f"scoring loss: its target and loss alone, median of {10 * step_rounds} rounds, over dam's step"
        )
    return Report(header, columns, list(rows.values()))


def main(argv: Optional[Sequence[str]] = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, help="the base config every variant switches on")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"of {list(VARIANTS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43], help="SEED of the runs of every variant")
    parser.add_argument("--max-iter", type=int, default=0, help="iterations (0: the config's); lr steps scale along")
    parser.add_argument("--eval-period", type=int, default=0, help="0: 2/5 of the iterations")
    parser.add_argument("--output-dir", default="output/convergence", help="one folder per run under it")
    parser.add_argument("--skip-training", action="store_true", help="only time the training steps")
    parser.add_argument("--rerun", action="store_true", help="train again even where a finished run is found")
    parser.add_argument("--step-warmup", type=int, default=2, help="untimed training steps per variant")
    parser.add_argument("--step-rounds", type=int, default=10, help="timed training steps per variant (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads of the step timing (0: default)")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides for every run")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    report = run(
        args.config_file,
        args.variants,
        args.seeds,
        args.max_iter,
        args.eval_period,
        args.output_dir,
        args.opts,
        args.skip_training,
        args.rerun,
        args.step_warmup,
        args.step_rounds,
    )
    report.emit(args.json)
    return report


if __name__ == "__main__":
    main()
