#!/usr/bin/env python
"""Benchmark of the multi-scale deformable attention core: the compiled op vs the grid_sample reference.

Three calls of Sparse DETR at the paper's test size (N=1, 850x1040 image -> 4 levels at strides 8/16/32/64, i.e.
(107, 130), (54, 65), (27, 33), (14, 17) = 18,549 tokens; M=8 heads, D=32, L=4, P=4, float32):
  - encoder:        Lq = S, every token queries, in raster order, around its own position;
  - sparse encoder: Lq = S/10, a random 10% of the tokens in random order (as a top-k by saliency picks them);
  - decoder:        Lq = 300 object queries at random reference points.
Sampling locations are the reference point plus offsets uniform in [-4, 4] pixels of each level (the scale of
Deformable DETR's learned offsets); attention weights are a softmax over the L*P points.

Reported per call: forward time (inputs without grad), forward+backward time (inputs with grad; backward of a
fixed random grad_output), each the median of --repeats runs after --warmup runs; and peak memory.
CPU peak memory is the growth of the process's peak resident set (VmHWM) during one call after a warm-up run. It
is taken in its own fresh subprocess per (call, implementation), with glibc's mmap threshold pinned so that freed
tensors leave the resident set (otherwise malloc keeps them and a later call reuses them unseen); the timings run
in another subprocess with malloc's defaults. It counts outputs, saved activations, temporaries and gradients.
CUDA peak memory is torch.cuda.max_memory_allocated() minus what was allocated before the call.

On a machine whose cores are shared, --rounds R repeats every measurement in R interleaved rounds and keeps, per
number, the best round (the run least disturbed by other processes); --threads sets torch's intra-op threads.

Usage: python projects/SparseDETR/bench_op.py [--repeats 5] [--warmup 1] [--rounds 1] [--threads T]
                                              [--calls encoder,sparse_encoder,decoder] [--json FILE]
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

LEVEL_SHAPES = [(107, 130), (54, 65), (27, 33), (14, 17)]
NUM_HEADS, HEAD_DIM, NUM_POINTS = 8, 32, 4
OFFSET_PIXELS = 4.0
CALLS = ("encoder", "sparse_encoder", "decoder")
IMPLS = ("reference", "op")


def make_call(call: str, device: str, dtype: torch.dtype, seed: int = 0):
    """value, spatial_shapes, level_start_index, sampling_locations, attention_weights of one call."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVEL_SHAPES, dtype=torch.int64)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(LEVEL_SHAPES)
    # Pixel centres of every token, level after level, normalized (x, y).
    centres = []
    for h, w in LEVEL_SHAPES:
        y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        centres.append(torch.stack([x.flatten(), y.flatten()], dim=-1))
    centres = torch.cat(centres)
    if call == "encoder":
        ref = centres
    elif call == "sparse_encoder":
        ref = centres[torch.randperm(S, generator=g)[: S // 10]]
    elif call == "decoder":
        ref = torch.rand(300, 2, generator=g)
    else:
        raise ValueError(f"unknown call {call!r}; expected one of {CALLS}")
    Lq = ref.shape[0]
    level_wh = shapes.flip(1).to(torch.float32).view(1, 1, 1, L, 1, 2)
    offsets = (torch.rand(1, Lq, NUM_HEADS, L, NUM_POINTS, 2, generator=g) * 2 - 1) * OFFSET_PIXELS
    loc = ref.view(1, Lq, 1, 1, 1, 2) + offsets / level_wh
    logits = torch.randn(1, Lq, NUM_HEADS, L * NUM_POINTS, generator=g)
    weights = logits.softmax(-1).view(1, Lq, NUM_HEADS, L, NUM_POINTS)
    value = torch.randn(1, S, NUM_HEADS, HEAD_DIM, generator=g)
    grad_out = torch.randn(1, Lq, NUM_HEADS * HEAD_DIM, generator=g)
    floats = [t.to(device=device, dtype=dtype) for t in (value, loc, weights, grad_out)]
    return floats[0], shapes.to(device), starts.to(device), floats[1], floats[2], floats[3]


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def _peak_cpu_mib(run: Callable[[], None]) -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _proc_status_kib("VmRSS")
    run()
    return (_proc_status_kib("VmHWM") - before) / 1024


def _peak_cuda_mib(run: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _median_ms(run: Callable[[], None], warmup: int, repeats: int, sync: Callable[[], None]) -> Dict[str, float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return {"median": statistics.median(times), "min": min(times)}


def run_child(call: str, impl: str, device: str, dtype_name: str, mode: str, warmup: int, repeats: int) -> Dict:
    """One (call, implementation) measured in this process: "time" or "memory"."""
    from sparse_detr.layers import ms_deform_attn, ms_deform_attn_available, ms_deform_attn_pytorch

    if impl == "op" and not ms_deform_attn_available():
        raise SystemExit("sparse_detr._C is not built: run `make build-ext` first")
    fn = ms_deform_attn if impl == "op" else ms_deform_attn_pytorch
    dtype = getattr(torch, dtype_name)
    value, shapes, starts, loc, weights, grad_out = make_call(call, device, dtype)
    leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]

    def forward():
        with torch.no_grad():
            fn(value, shapes, starts, loc, weights)

    def forward_backward():
        for t in leaves:
            t.grad = None
        fn(leaves[0], shapes, starts, leaves[1], leaves[2]).backward(grad_out)
        for t in leaves:  # the gradients stay alive until here, as in training
            t.grad = None

    result = {"call": call, "impl": impl, "device": device, "dtype": dtype_name, "Lq": loc.shape[1]}
    if mode == "time":
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        result["forward_ms"] = _median_ms(forward, warmup, repeats, sync)
        result["forward_backward_ms"] = _median_ms(forward_backward, warmup, repeats, sync)
    else:
        peak = _peak_cuda_mib if device == "cuda" else _peak_cpu_mib
        # Each after a warm-up run, so that one-time allocations are not counted.
        forward()
        result["forward_peak_mib"] = peak(forward)
        forward_backward()
        result["forward_backward_peak_mib"] = peak(forward_backward)
    return result


def _spawn(call: str, impl: str, device: str, dtype: str, args) -> Dict:
    result = {}
    for mode in ("time", "memory"):
        env = dict(os.environ)
        if mode == "memory":
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # see the module docstring; timings keep malloc's default
        cmd = [sys.executable, os.path.abspath(__file__), "--child", call, impl, device, dtype, mode,
               "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return result


def _best(runs: Sequence[Dict]) -> Dict:
    """Per number, the best of several rounds of the same measurement."""
    best = dict(runs[0])
    for key in ("forward_ms", "forward_backward_ms"):
        best[key] = {k: min(r[key][k] for r in runs) for k in ("median", "min")}
    for key in ("forward_peak_mib", "forward_backward_peak_mib"):
        best[key] = min(r[key] for r in runs)
    return best


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return re.search(r"Model name:\s+(.*)", out).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "unknown CPU"


def _format(results: List[Dict], device: str, dtype: str) -> str:
    by = {(r["call"], r["impl"]): r for r in results if r["device"] == device and r["dtype"] == dtype}
    calls = [c for c in CALLS if (c, "op") in by and (c, "reference") in by]
    lines = [
        f"| call ({device}, {dtype}) | Lq | forward ref / op (ms) | speed-up | fwd+bwd ref / op (ms) | speed-up | "
        "peak fwd ref / op (MiB) | peak fwd+bwd ref / op (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in calls:
        ref, op = by[(c, "reference")], by[(c, "op")]
        f_ref, f_op = ref["forward_ms"]["median"], op["forward_ms"]["median"]
        b_ref, b_op = ref["forward_backward_ms"]["median"], op["forward_backward_ms"]["median"]
        lines.append(
            f"| {c} | {op['Lq']} | {f_ref:.1f} / {f_op:.1f} | {f_ref / f_op:.1f}x | {b_ref:.1f} / {b_op:.1f} | "
            f"{b_ref / b_op:.1f}x | {ref['forward_peak_mib']:.0f} / {op['forward_peak_mib']:.0f} | "
            f"{ref['forward_backward_peak_mib']:.0f} / {op['forward_backward_peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the best round is kept")
    parser.add_argument("--threads", type=int, help="intra-op threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--calls", default=",".join(CALLS), help=f"comma-separated subset of {CALLS}")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--child", nargs=5, metavar=("CALL", "IMPL", "DEVICE", "DTYPE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_child(*args.child, warmup=args.warmup, repeats=args.repeats)))
        return

    calls = [c for c in args.calls.split(",") if c]
    for c in calls:
        if c not in CALLS:
            parser.error(f"unknown call {c!r}; expected some of {CALLS}")
    from sparse_detr.layers import ms_deform_attn_available

    if not ms_deform_attn_available():
        raise SystemExit("sparse_detr._C is not built: run `make build-ext` first")
    from sparse_detr import _C

    targets = [("cpu", "float32")]
    if torch.cuda.is_available() and _C.compiled_with_cuda():
        targets += [("cuda", "float32"), ("cuda", "float16")]
    print(f"CPU: {_cpu_model()}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    rounds = f", best of {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"median of {args.repeats} runs after {args.warmup} warm-up{rounds}; peak = extra memory during one call\n")
    results = []
    for device, dtype in targets:
        per_round = [
            [_spawn(call, impl, device, dtype, args) for call in calls for impl in IMPLS] for _ in range(args.rounds)
        ]
        results += [_best(runs) for runs in zip(*per_round)]
        print(_format(results, device, dtype) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
