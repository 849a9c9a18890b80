"""Timing and memory helpers shared by the benchmarks."""

import json
import resource
import statistics
import subprocess
import sys
import time

import jax


def median_time(fn, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(fns: list, repeats: int) -> list[list[float]]:
    """Wall times of each ``fn()``, timed round by round (each call warm, right after an
    untimed one), so that load drift on a shared machine hits every candidate alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            ts.append(median_time(fn, 1))
    return times


def maxrss_mb() -> float:
    """This process's peak resident set size so far, in MiB."""
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def child_result(cmd: list[str], what: str) -> dict:
    """Runs a benchmark's child process and returns the last JSON line it printed."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = "\n".join(proc.stderr.splitlines()[-20:])
    raise RuntimeError(f"{what} failed (rc {proc.returncode}):\n{tail}")
