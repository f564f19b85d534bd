"""Timing and memory measurement for the benchmark tools: interleaved runs and the peak memory of one call."""

import ctypes
import gc
import os
import platform
import time
from typing import Any, Callable, Dict, List, Optional

import torch

__all__ = ["describe_device", "interleaved_times", "peak_memory_growth", "return_freed_memory"]


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU's model, logical CPUs and torch threads."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"


def interleaved_times(
    fns: Dict[str, Callable[[], Any]], warmup: int, iters: int, sync: Optional[Callable[[], None]] = None
) -> Dict[str, List[float]]:
    """Seconds per call of each function, `iters` times after `warmup` untimed calls each.

    The functions take turns within every iteration, in rotating order, so that the slow phases of a shared
    machine are spread over all of them and their ratios stay comparable.

    sync: called before starting and after stopping each clock (e.g. torch.cuda.synchronize).
    """
    names = list(fns)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            fns[name]()
    for it in range(iters):
        for k in range(len(names)):
            name = names[(it + k) % len(names)]
            if sync is not None:
                sync()
            start = time.perf_counter()
            fns[name]()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - start)
    return times


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_freed_memory() -> None:
    """Give the memory freed so far back to the system, and make glibc serve allocations of 64 KiB and more with
    mmap, so that memory freed later returns too: a measurement then sees every page a call touches, instead of
    free pages still resident from earlier work being reused unseen (no-op without glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    # the free chunks of every arena, coalesced by earlier frees under glibc's default thresholds, would otherwise
    # serve a large allocation from resident pages (a whole test session's process measured 0 bytes for 64 MiB)
    libc.malloc_trim(0)


def peak_memory_growth(fn: Callable[[], Any]) -> Optional[int]:
    """Bytes by which the process's peak resident set (VmHWM) grows during one call of `fn`, from the resident set
    just before it: what the call allocates and touches (activations, temporaries, outputs), not what was resident
    already (weights). Linux only (None elsewhere).

    Memory that earlier calls freed but the allocator kept is reused unseen: call :func:`return_freed_memory` before
    them (it is called here too, for what is freed from now on). The peak is reset through /proc/self/clear_refs.
    """
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    return_freed_memory()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024
