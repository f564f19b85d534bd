"""The one measurement harness of every benchmark tool (op, throughput, deploy, training step): timing of several
functions taking turns, with medians and per-round ratios; the peak memory of a call, in a process of its own; and
the description of the device that measured them.

Why interleaved: on a shared or throttling machine the load changes over a run. When the functions take turns
within every round (in rotating order), a slow phase hits all of them alike, so their ratios stay comparable even
when the absolute times drift; the median of the per-round ratios is steadier still.

Why a fresh process for memory: memory that earlier work freed stays resident in the allocator and is reused
unseen, which makes a call that runs after others look free. A new interpreter that builds only the one call,
warms it up and then measures it sees what the call itself touches.
"""

import ctypes
import gc
import json
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from tabulate import tabulate

__all__ = ["Report", "Timings", "check_rounds", "describe_device", "interleaved_times", "peak_memory", "synchronize"]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a clock read after it is meaningful."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Seconds of every call: ``seconds[name][i]`` is the call of ``name`` in round ``i`` (every name runs once a
    round)."""

    seconds: Dict[str, List[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def speedup(self, baseline: str, name: str) -> float:
        """How many times faster ``name`` ran than ``baseline``: the median of the per-round ratios."""
        return statistics.median(b / t for b, t in zip(self.seconds[baseline], self.seconds[name]))


def check_rounds(warmup: int, iters: int) -> None:
    """Raises ValueError unless there are >= 0 warm-up and >= 1 timed rounds (a tool checks before its set-up)."""
    if warmup < 0 or iters < 1:
        raise ValueError(f"warm-up rounds must be >= 0 and timed rounds >= 1, got {warmup} and {iters}")


def interleaved_times(
    fns: Dict[str, Callable[[], Any]], warmup: int, iters: int, device: Optional[torch.device] = None
) -> Timings:
    """Times ``iters`` rounds of every function, after ``warmup`` untimed rounds; within round ``i`` the functions
    run in the order of ``fns`` rotated by ``i``. The clock is read after :func:`synchronize` on ``device`` (default
    the CPU)."""
    device = torch.device("cpu") if device is None else device
    check_rounds(warmup, iters)
    names = list(fns)
    seconds: Dict[str, List[float]] = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            fns[name]()
    for it in range(iters):
        for k in range(len(names)):
            name = names[(it + k) % len(names)]
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return Timings(seconds)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _return_freed_memory() -> None:
    """Freed memory back to the system from now on: glibc serves allocations of 64 KiB and more with mmap (so they
    leave the resident set when freed), and what is free already is trimmed. A no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    libc.malloc_trim(0)


def _measure_in_this_process(builder: Callable[..., Callable[[], Any]], args: tuple, threads: int, warmup: int):
    torch.set_num_threads(threads)
    _return_freed_memory()
    call = builder(*args)
    device = getattr(call, "device", torch.device("cpu"))
    for _ in range(warmup):
        call()
    gc.collect()
    synchronize(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    _return_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident set
    before = _status_kib("VmRSS")
    call()
    return (_status_kib("VmHWM") - before) * 1024


def peak_memory(builder: Callable[..., Callable[[], Any]], *args: Any, warmup: int = 1) -> Optional[int]:
    """Bytes by which one call grows the memory in use at its peak, measured in a new interpreter.

    There ``builder(*args)`` makes the call (a function of no arguments; give it a ``device`` attribute to measure
    CUDA memory: ``torch.cuda.max_memory_allocated`` minus what was allocated before), which runs ``warmup`` times
    and then once more under measurement. On the CPU: the growth of the peak resident set (VmHWM) over the resident
    set before the call, i.e. the activations, temporaries and outputs it touches, not the weights. None where
    Linux's /proc is missing.

    ``builder`` must be importable by name (a module-level function, also of a script run as ``__main__``), and so
    must ``args`` be picklable. The new process uses this one's number of torch threads.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_measure_in_this_process, builder, args, torch.get_num_threads(), warmup).result()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> str:
    """The GPU's name and CUDA version, or the CPU's model, its logical CPUs and torch's threads."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = f"{_cpu_model()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"
    return f"{cpu}, torch {torch.__version__}"


@dataclass
class Report:
    """What a benchmark tool prints and saves: the conditions (one line), a markdown table, and its rows as data.

    Attributes:
        header: the device and the method, e.g. "<describe_device>; median of 5 runs after 1 warm-up".
        columns: the table's column names.
        rows: one dict per row, the table's cells first (keyed by ``columns``), then any raw figures (seconds,
            bytes) under other keys for the JSON.
    """

    header: str
    columns: List[str]
    rows: List[Dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        return tabulate([[row[c] for c in self.columns] for row in self.rows], headers=self.columns, tablefmt="pipe")

    def emit(self, json_path: Optional[str] = None) -> None:
        """Prints the header and the table; with ``json_path``, also writes the whole report there as JSON (with the
        table as printed, under "table")."""
        print(self.header)
        print(self.table())
        if json_path:
            with open(json_path, "w") as f:
                json.dump({**asdict(self), "table": self.table()}, f, indent=1)
