"""Timing, memory and machine description shared by the benchmarks.

Timing rules (every number in the tables follows them):

* competing implementations run interleaved in one process, ``A B C A B C ...``, so a
  change of machine load hits all of them alike;
* each round first runs an untimed ``setup`` (the forward pass, for a backward-only
  measurement), then times ``run`` alone between two device synchronisations, with the
  garbage collector off;
* the first ``warmup`` rounds are discarded; the reported time is the median of the
  remaining ``reps`` (at least 7) and each ratio is the median over rounds of the paired
  ratio ``time(A) / time(B)`` measured in the same round.

Peak memory is measured in a fresh subprocess per configuration: on CUDA with
``torch.cuda.max_memory_allocated``, on CPU as the peak resident set size (``VmHWM``, reset
through ``/proc/self/clear_refs`` just before the measured call) minus the resident size at
that moment.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

MIN_REPS = 7


@dataclass
class Impl:
    """One competitor: ``setup()`` builds its untimed state, ``run(state)`` is timed."""

    name: str
    setup: Callable[[], Any]
    run: Callable[[Any], Any]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(impls: Sequence[Impl], reps: int, warmup: int, device: torch.device) -> Dict[str, List[float]]:
    """Seconds per round of each implementation, measured ``A B C A B C ...``.

    Args:
        impls: the competitors.
        reps: timed rounds kept (at least ``MIN_REPS``).
        warmup: rounds run first and discarded.
        device: synchronised around each timed call.

    Returns:
        ``{name: [seconds per kept round]}``.

    Raises:
        ValueError: ``reps`` below ``MIN_REPS`` or ``warmup`` negative.
    """
    if reps < MIN_REPS:
        raise ValueError(f"reps must be at least {MIN_REPS} (medians of fewer rounds are noise), got {reps}.")
    if warmup < 0:
        raise ValueError(f"warmup must be non-negative, got {warmup}.")
    times: Dict[str, List[float]] = {impl.name: [] for impl in impls}
    for round_index in range(warmup + reps):
        for impl in impls:
            state = impl.setup()
            gc.collect()
            sync(device)
            gc.disable()
            try:
                start = time.perf_counter()
                impl.run(state)
                sync(device)
                elapsed = time.perf_counter() - start
            finally:
                gc.enable()
            del state
            if round_index >= warmup:
                times[impl.name].append(elapsed)
    return times


def summarize(times: Dict[str, List[float]], ratios: Sequence[tuple]) -> Dict[str, Any]:
    """Medians, quartiles and minima per implementation, and ratios ``(num, den)``.

    ``ratios`` are medians of the per-round paired ratios (the reported figure);
    ``best_ratios`` divide the minima, the time each implementation takes when nothing
    else competes for the CPU — a second view that is robust to other jobs preempting
    the process on a shared machine.
    """
    out: Dict[str, Any] = {"median_s": {}, "q1_s": {}, "q3_s": {}, "min_s": {}, "ratios": {}, "best_ratios": {}}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        out["median_s"][name] = statistics.median(ts)
        out["q1_s"][name], out["q3_s"][name] = q[0], q[2]
        out["min_s"][name] = min(ts)
    for num, den in ratios:
        if num in times and den in times:
            paired = [a / b for a, b in zip(times[num], times[den])]
            out["ratios"][f"{num}/{den}"] = statistics.median(paired)
            out["best_ratios"][f"{num}/{den}"] = min(times[num]) / min(times[den])
    return out


def max_rel_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """``max|a − b| / max(max|a|, max|b|)`` over all leaves (0 when both are zero)."""
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    scale = max(max(float(x.abs().max()) for x in a), max(float(y.abs().max()) for y in b))
    return diff / scale if scale > 0 else diff


def agreement(results: Dict[str, Sequence[torch.Tensor]], tol: float) -> Dict[str, Any]:
    """Max relative difference of every pair of gradients; ``ok`` when all are below ``tol``."""
    names = list(results)
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pairs[f"{a} vs {b}"] = max_rel_diff(results[a], results[b])
    worst = max(pairs.values()) if pairs else 0.0
    return {"pairs": pairs, "max_rel_diff": worst, "tol": tol, "ok": bool(worst <= tol)}


# ---------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> Dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def machine_line(info: Dict[str, Any]) -> str:
    dev = info["device"] if "gpu" not in info else f"{info['device']} ({info['gpu']}, CUDA {info['cuda']})"
    load = info.get("load_average")
    load_txt = "" if not load else f", load average {load[0]:.2f} at start"
    return (
        f"{info['cpu']}, {info['cpu_count']} logical CPUs, torch threads: {info['torch_threads']}, "
        f"torch {info['torch']}, Python {info['python']}, device {dev}{load_txt}"
    )


# ---------------------------------------------------------------------------- memory


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak(fn: Callable[[], Any], device: torch.device) -> Dict[str, Any]:
    """Run ``fn()`` once and return the increase of peak memory it caused, in MiB.

    Call it in a fresh process, before anything else has run the same computation, so
    that allocator caches from an earlier run do not hide the allocation.
    """
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mib": (peak - base) / 2**20, "how": "torch.cuda.max_memory_allocated"}
    if _reset_peak_rss():
        base = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
        if base is not None and peak is not None:
            return {"peak_mib": (peak - base) / 1024, "how": "peak RSS (VmHWM) minus RSS before the call"}
    import resource

    # ru_maxrss is KiB on Linux, bytes on macOS; only its increase is used.
    unit = 1 if sys.platform.startswith("linux") else 1 / 1024
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    return {"peak_mib": (peak - base) / 1024, "how": "increase of ru_maxrss (a lower bound)"}
