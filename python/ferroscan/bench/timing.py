"""Timing helpers shared by every benchmark: median of CUDA-event timings after warm-up."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


def median_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of ``fn`` in ms. On CUDA: triton.testing.do_bench (flushes L2 between runs)
    when Triton is present, else CUDA events; on CPU: a wall clock."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        except ImportError:
            pass
        fn()
        torch.cuda.synchronize(device)
        samples = []
        for _ in range(max(5, int(rep_ms))):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
            if sum(samples) > rep_ms:
                break
        return statistics.median(samples)
    fn()
    samples = []
    deadline = time.perf_counter() + rep_ms / 1e3 * 20
    while len(samples) < 3 or (len(samples) < 20 and time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def fixed_reps_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int,
    reps: int,
    before: Optional[Callable[[], object]] = None,
) -> float:
    """Median time of ``fn`` in ms over exactly ``reps`` runs after ``warmup`` runs.

    For code that communicates: every rank must run the same number of calls (the adaptive
    :func:`median_ms` may not). ``before`` runs untimed before each timed call (e.g. a barrier,
    so that the ranks start together). Wall clock around the call, with the device synchronized
    before and after."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if before is not None:
            before()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)
