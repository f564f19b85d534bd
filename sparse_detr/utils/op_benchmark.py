"""Benchmark of the multi-scale deformable attention core: the compiled op vs the grid_sample reference
(projects/SparseDETR/bench_op.py).

Three calls of Sparse DETR at the paper's test size (N=1, 850x1040 image -> 4 levels at strides 8/16/32/64, i.e.
(107, 130), (54, 65), (27, 33), (14, 17) = 18,549 tokens; M=8 heads, D=32, L=4, P=4, float32):
  - encoder:        Lq = S, every token queries, in raster order, around its own position;
  - sparse encoder: Lq = S/10, a random 10% of the tokens in random order (as a top-k by saliency picks them);
  - decoder:        Lq = 300 object queries at random reference points.
Sampling locations are the reference point plus offsets uniform in [-4, 4] pixels of each level (the scale of
Deformable DETR's learned offsets); attention weights are a softmax over the L*P points.

Reported per call: forward time (inputs without grad), forward+backward time (inputs with grad; backward of a
fixed random grad_output), each the median of --repeats runs after --warmup runs, and the speed-up as the median
of per-pair ratios: the two implementations run alternately in one process, so that on cores shared with other
work each pair sees about the same load. Then peak memory: on CPU the growth of the process's peak resident set
(VmHWM) during one call after a warm-up run, in a separate fresh subprocess with glibc's mmap threshold pinned so
that freed tensors leave the resident set (otherwise malloc keeps them and a later call reuses them unseen; the
timings keep malloc's defaults). It counts outputs, saved activations, temporaries and gradients. On CUDA it is
torch.cuda.max_memory_allocated() minus what was allocated before the call.
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..layers import ms_deform_attn, ms_deform_attn_available, ms_deform_attn_pytorch

__all__ = ["CALLS", "describe_setup", "format_results", "make_call", "run_op_benchmark"]

LEVEL_SHAPES = [(107, 130), (54, 65), (27, 33), (14, 17)]
NUM_HEADS, HEAD_DIM, NUM_POINTS = 8, 32, 4
OFFSET_PIXELS = 4.0
CALLS = ("encoder", "sparse_encoder", "decoder")


def make_call(call: str, device: str, dtype: torch.dtype, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """value [1, S, M, D], spatial_shapes [L, 2], level_start_index [L], sampling_locations [1, Lq, M, L, P, 2],
    attention_weights [1, Lq, M, L, P] of one call, and a gradient of its output [1, Lq, M * D]."""
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


def _implementations() -> Dict[str, Callable[..., torch.Tensor]]:
    if not ms_deform_attn_available():
        raise RuntimeError("sparse_detr._C is not built: run `make build-ext` first")
    return {"reference": ms_deform_attn_pytorch, "op": ms_deform_attn}


def _runners(fn, call: str, device: str, dtype: torch.dtype) -> Tuple[Callable[[], None], Callable[[], None], int]:
    """forward (no grad), forward+backward, and Lq of one call."""
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

    return forward, forward_backward, loc.shape[1]


def time_child(call: str, device: str, dtype_name: str, warmup: int, repeats: int) -> Dict:
    """Both implementations timed in one process, alternating run by run: on cores shared with other work, each
    pair of runs sees about the same load, so the median of the per-pair ratios is a steadier speed-up."""
    fns = _implementations()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    result: Dict = {"call": call, "device": device, "dtype": dtype_name}
    for phase, index in (("forward", 0), ("forward_backward", 1)):
        runs = {}
        for impl, fn in fns.items():
            runners = _runners(fn, call, device, getattr(torch, dtype_name))
            runs[impl] = runners[index]
            result["Lq"] = runners[2]
        times: Dict[str, List[float]] = {impl: [] for impl in runs}
        for i in range(warmup + repeats):
            for impl, run in runs.items():
                sync()
                t = time.perf_counter()
                run()
                sync()
                if i >= warmup:
                    times[impl].append((time.perf_counter() - t) * 1e3)
        for impl, ts in times.items():
            result[f"{impl}_{phase}_ms"] = statistics.median(ts)
        result[f"{phase}_speedup"] = statistics.median(r / o for r, o in zip(times["reference"], times["op"]))
    return result


def memory_child(call: str, device: str, dtype_name: str) -> Dict:
    """Peak extra memory of one call, per implementation and phase, each after a warm-up run of its own."""
    peak = _peak_cuda_mib if device == "cuda" else _peak_cpu_mib
    result = {}
    for impl, fn in _implementations().items():
        forward, forward_backward, _ = _runners(fn, call, device, getattr(torch, dtype_name))
        forward()
        result[f"{impl}_forward_peak_mib"] = peak(forward)
        forward_backward()
        result[f"{impl}_forward_backward_peak_mib"] = peak(forward_backward)
    return result


def _spawn(mode: str, call: str, device: str, dtype: str, warmup: int, repeats: int, threads: Optional[int]) -> Dict:
    """Runs :func:`time_child` or :func:`memory_child` in a fresh interpreter (this module as __main__)."""
    env = dict(os.environ)
    if mode == "memory" and device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # see the module docstring; timings keep malloc's default
    cmd = [
        sys.executable,
        "-m",
        __name__,
        mode,
        call,
        device,
        dtype,
        "--warmup",
        str(warmup),
        "--repeats",
        str(repeats),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return re.search(r"Model name:\s+(.*)", out).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "unknown CPU"


def format_results(results: List[Dict]) -> str:
    """A markdown table of :func:`run_op_benchmark`'s results."""
    lines = [
        "| call | device, dtype | Lq | forward ref / op (ms) | speed-up | fwd+bwd ref / op (ms) | speed-up | "
        "peak fwd ref / op (MiB) | peak fwd+bwd ref / op (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['call']} | {r['device']}, {r['dtype']} | {r['Lq']} "
            f"| {r['reference_forward_ms']:.1f} / {r['op_forward_ms']:.1f} | {r['forward_speedup']:.1f}x "
            f"| {r['reference_forward_backward_ms']:.1f} / {r['op_forward_backward_ms']:.1f} "
            f"| {r['forward_backward_speedup']:.1f}x "
            f"| {r['reference_forward_peak_mib']:.0f} / {r['op_forward_peak_mib']:.1f} "
            f"| {r['reference_forward_backward_peak_mib']:.0f} / {r['op_forward_backward_peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def describe_setup(warmup: int, repeats: int) -> str:
    """The machine and the method, as lines above the table."""
    lines = [f"CPU: {_cpu_model()}, {torch.get_num_threads()} threads; torch {torch.__version__}"]
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()}")
    lines.append(
        f"time: median of {repeats} runs after {warmup} warm-up, the implementations alternating; "
        "speed-up: median of the per-pair ratios; peak: extra memory during one call"
    )
    return "\n".join(lines)


def run_op_benchmark(
    calls: Sequence[str] = CALLS,
    warmup: int = 1,
    repeats: int = 7,
    threads: Optional[int] = None,
    targets: Optional[Sequence[Tuple[str, str]]] = None,
) -> List[Dict]:
    """Times and memory of every call of ``calls``, on each (device, dtype name) of ``targets``; by default on the
    CPU in float32 and, where a GPU and the op's CUDA kernels are there, on CUDA in float32 and float16. Each
    measurement in a subprocess of its own.

    Args:
        threads: intra-op threads of the subprocesses (torch.set_num_threads); None: torch's default.
    """
    unknown = [c for c in calls if c not in CALLS]
    if unknown:
        raise ValueError(f"unknown calls {unknown}; expected some of {CALLS}")
    _implementations()
    from sparse_detr import _C  # importable: _implementations() checked that the extension is built

    if targets is None:
        targets = [("cpu", "float32")]
        if torch.cuda.is_available() and _C.compiled_with_cuda():
            targets += [("cuda", "float32"), ("cuda", "float16")]
    results = []
    for device, dtype in targets:
        for call in calls:
            timing = _spawn("time", call, device, dtype, warmup, repeats, threads)
            results.append({**timing, **_spawn("memory", call, device, dtype, warmup, repeats, threads)})
    return results


def _child_main(argv: Optional[Sequence[str]] = None) -> None:
    """One measurement (see :func:`_spawn`), printed as one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("time", "memory"))
    parser.add_argument("call", choices=CALLS)
    parser.add_argument("device")
    parser.add_argument("dtype")
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "time":
        print(json.dumps(time_child(args.call, args.device, args.dtype, args.warmup, args.repeats)))
    else:
        print(json.dumps(memory_child(args.call, args.device, args.dtype)))


if __name__ == "__main__":
    _child_main()
