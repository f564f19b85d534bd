#!/usr/bin/env python
"""Benchmark of the multi-scale deformable attention core: the compiled op against the grid_sample reference.

Three calls of Sparse DETR at the paper's test size (N=1, 850x1040 image -> 4 levels at strides 8/16/32/64, i.e.
(107, 130), (54, 65), (27, 33), (14, 17) = 18,549 tokens; M=8 heads, D=32, L=4, P=4):
  - encoder:        Lq = S, every token queries, in raster order, around its own position;
  - sparse_encoder: Lq = S/10, a random 10% of the tokens in random order (as a top-k by saliency picks them);
  - decoder:        Lq = 300 object queries at random reference points.
Sampling locations are the reference point plus offsets uniform in [-4, 4] pixels of each level (the scale of
Deformable DETR's learned offsets); attention weights are a softmax over the L*P points.

Per call: forward (no grad) and forward+backward (of a fixed random grad_output) time of both implementations,
taking turns run by run (sparse_detr.measure), medians, and the speed-up as the median of the per-run ratios; then
the peak memory of one call of each, in a process of its own after a warm-up (outputs, saved activations,
temporaries and gradients).

The CPU rows name the instruction-set level the op's CPU kernels ran at (the CPU's best; SPARSE_DETR_CPU_ISA=v3
forces the AVX2 kernels on an AVX-512 machine, v4 / v3 / default).

Usage: python projects/SparseDETR/bench_op.py [--repeats 7] [--warmup 1] [--threads T]
                                              [--calls encoder,sparse_encoder,decoder] [--json FILE]
                                              [--targets cpu:float32,cuda:bfloat16,...]
"""

import argparse
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from sparse_detr.layers import ms_deform_attn, ms_deform_attn_available, ms_deform_attn_cpu_isa, ms_deform_attn_pytorch
from sparse_detr.measure import Report, check_rounds, describe_device, interleaved_times, peak_memory

LEVEL_SHAPES = [(107, 130), (54, 65), (27, 33), (14, 17)]
NUM_HEADS, HEAD_DIM, NUM_POINTS = 8, 32, 4
OFFSET_PIXELS = 4.0
CALLS = ("encoder", "sparse_encoder", "decoder")
IMPLEMENTATIONS = {"reference": ms_deform_attn_pytorch, "op": ms_deform_attn}
PHASES = ("forward", "forward_backward")


def make_call(call: str, device: str, dtype: torch.dtype, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """value [1, S, M, D], spatial_shapes [L, 2], level_start_index [L], sampling_locations [1, Lq, M, L, P, 2],
    attention_weights [1, Lq, M, L, P] of one call, and a gradient of its output [1, Lq, M * D]."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVEL_SHAPES, dtype=torch.int64)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(LEVEL_SHAPES)
    # pixel centres of every token, level after level, normalized (x, y)
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


def make_runner(call: str, device: str, dtype: str, implementation: str, phase: str) -> Callable[[], None]:
    """One run of ``phase`` ("forward" without grad, or "forward_backward") of an implementation on a call's inputs;
    the runner's ``device`` attribute tells the harness where to measure memory."""
    fn = IMPLEMENTATIONS[implementation]
    value, shapes, starts, loc, weights, grad_out = make_call(call, device, getattr(torch, dtype))
    leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]

    def forward() -> None:
        with torch.no_grad():
            fn(value, shapes, starts, loc, weights)

    def forward_backward() -> None:
        fn(leaves[0], shapes, starts, leaves[1], leaves[2]).backward(grad_out)
        for t in leaves:  # the gradients stay alive until here, as in training
            t.grad = None

    runner = forward if phase == "forward" else forward_backward
    runner.device = torch.device(device)
    return runner


def default_targets() -> List[Tuple[str, str]]:
    """The CPU in float32 and, where a GPU and the op's CUDA kernels are there, CUDA in float32 and float16."""
    from sparse_detr import _C  # importable: run() checked that the extension is built

    targets = [("cpu", "float32")]
    if torch.cuda.is_available() and _C.compiled_with_cuda():
        targets += [("cuda", "float32"), ("cuda", "float16")]
    return targets


def run(
    calls: Sequence[str], targets: Sequence[Tuple[str, str]], warmup: int, repeats: int, memory: bool = True
) -> Report:
    """Times (and with ``memory`` the peak memory of) both implementations on each call and (device, dtype)."""
    check_rounds(warmup, repeats)
    unknown = [c for c in calls if c not in CALLS]
    if unknown:
        raise ValueError(f"--calls: unknown {unknown}; expected some of {CALLS}")
    if not ms_deform_attn_available():
        raise RuntimeError("sparse_detr._C is not built: run `make build-ext` first")
    device = torch.device(targets[0][0])
    report = Report(
        header=f"{describe_device(device)}; time: median of {repeats} runs after {warmup} warm-up, the "
        "implementations alternating; speed-up: median of the per-run ratios; peak: extra memory of one call",
        columns=["call", "device, dtype", "kernels", "Lq", "fwd ref / op (ms)", "fwd speed-up", "fwd+bwd ref / op (ms)",
                 "fwd+bwd speed-up", "peak fwd ref / op (MiB)", "peak fwd+bwd ref / op (MiB)"],
    )  # fmt: skip
    for dev, dtype in targets:
        for call in calls:
            num_queries = make_call(call, "cpu", torch.float32)[3].shape[1]
            kernels = ms_deform_attn_cpu_isa() if dev == "cpu" else "CUDA"
            row = {"call": call, "device, dtype": f"{dev}, {dtype}", "kernels": kernels, "Lq": num_queries}
            for phase, label in zip(PHASES, ("fwd", "fwd+bwd")):
                fns = {impl: make_runner(call, dev, dtype, impl, phase) for impl in IMPLEMENTATIONS}
                timings = interleaved_times(fns, warmup, repeats, torch.device(dev))
                ms = {impl: 1e3 * timings.median(impl) for impl in fns}
                row[f"{label} ref / op (ms)"] = f"{ms['reference']:.1f} / {ms['op']:.1f}"
                row[f"{label} speed-up"] = f"{timings.speedup('reference', 'op'):.1f}x"
                row[f"{phase}_ms"] = ms
                peaks = {
                    impl: peak_memory(make_runner, call, dev, dtype, impl, phase) if memory else None for impl in fns
                }
                row[f"{phase}_peak_bytes"] = peaks
                row[f"peak {label} ref / op (MiB)"] = " / ".join(
                    "—" if p is None else f"{p / 2**20:.0f}" for p in peaks.values()
                )
            report.rows.append(row)
    return report


def main(argv: Optional[Sequence[str]] = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each implementation (median kept)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, help="intra-op threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--calls", default=",".join(CALLS), help=f"comma-separated subset of {CALLS}")
    parser.add_argument("--no-memory", action="store_true", help="times only (memory takes a process per figure)")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument(
        "--targets",
        help="comma-separated DEVICE:DTYPE pairs (default: cpu:float32, and cuda:float32, cuda:float16 where the "
        "CUDA kernels run)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = [tuple(t.split(":", 1)) for t in args.targets.split(",") if t] if args.targets else default_targets()
    report = run([c for c in args.calls.split(",") if c], targets, args.warmup, args.repeats, not args.no_memory)
    report.emit(args.json)
    return report


if __name__ == "__main__":
    main()
