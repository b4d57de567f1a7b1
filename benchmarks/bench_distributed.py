"""Data-parallel hyperparameter optimisation on 1, 2 and 4 processes: time, communication, agreement.

Launches ``examples/hpo_distributed.py`` with ``torchrun --nproc_per_node=N`` for every N,
interleaved over ``--repeats`` rounds (1, 2, 4, 1, 2, 4, ...) so that a change in the load of a
shared machine hits every N alike, and prints one markdown row per N: the median over rounds of
the per-step median times, the all-reduces and bytes per step (counted by wrapping
``torch.distributed.all_reduce`` inside the example) and the largest relative difference between
the hypergradient and the one computed by one process on all the data. The load average before
and after is printed too: on a machine with fewer cores than processes the ranks share cores.

Usage (from the repository root)::

    python benchmarks/bench_distributed.py --quick
    python benchmarks/bench_distributed.py --data synthetic --n-train 200000 --steps 6 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hpo_distributed.py"


def launch(processes: int, example_args: Sequence[str], workdir: Path) -> Dict[str, object]:
    """One ``torchrun`` of the example; returns its JSON metrics."""
    out = workdir / f"metrics_{processes}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(EXAMPLE), "--json", str(out), "--out", str(workdir), *example_args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2,4", help="comma-separated process counts")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true", help="one round of the example's --quick run")
    parser.add_argument("--json", default=None, help="write every run's metrics here")
    args, example_args = parser.parse_known_args(argv)
    counts = [int(n) for n in args.processes.split(",")]
    repeats = 1 if args.quick else args.repeats
    if args.quick:
        example_args = ["--quick", *example_args]
    runs: Dict[int, List[Dict[str, object]]] = {n: [] for n in counts}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for n in counts:
                runs[n].append(launch(n, example_args, Path(tmp)))
    load_after = os.getloadavg()

    def med(n: int, key: str) -> float:
        return median(float(r[key]) for r in runs[n])  # type: ignore[arg-type]

    first = runs[counts[0]][0]
    print(f"{first['data']} data, {first['n_train']} training rows, {first['features']} features; "
          f"{os.cpu_count()} CPU cores, 1 thread per process; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after; median of {repeats} interleaved run(s)\n")
    print("| processes | step (ms) | inner solve (ms) | hypergradient (ms) | all-reduces per step "
          "(inner / hypergradient) | bytes per step (inner / hypergradient) | max rel. error vs 1 process "
          "on all data | max difference across ranks |")
    print("|---|---|---|---|---|---|---|---|")
    for n in counts:
        errors = [r["hypergradient_relative_error_max"] for r in runs[n]]
        spread = max(float(r["hypergradient_spread_across_ranks_max"]) for r in runs[n])  # type: ignore[arg-type]
        print(f"| {n}{' (oversubscribed)' if n > (os.cpu_count() or 1) else ''} "
              f"| {1e3 * med(n, 'step_seconds_median'):.1f} | {1e3 * med(n, 'forward_seconds_median'):.1f} "
              f"| {1e3 * med(n, 'backward_seconds_median'):.1f} "
              f"| {med(n, 'all_reduces_forward_per_step'):.0f} / {med(n, 'all_reduces_backward_per_step'):.0f} "
              f"| {med(n, 'all_reduce_bytes_forward_per_step'):.0f} / "
              f"{med(n, 'all_reduce_bytes_backward_per_step'):.0f} "
              f"| {max(float(e) for e in errors):.1e} | {spread:.1e} |")  # type: ignore[arg-type]
    result = {"load_average_before": load_before, "load_average_after": load_after, "runs": runs}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
