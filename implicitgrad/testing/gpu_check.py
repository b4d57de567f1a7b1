"""Verify on a GPU what implicitgrad promises for CUDA, in one command, and report.

From the root of a source checkout::

    python -m implicitgrad.testing.gpu_check          # or: bash scripts/gpu_check.sh

1. Probes the machine: torch's version and CUDA build, the devices torch sees, the GPUs
   ``nvidia-smi`` lists.
2. When a GPU is present but torch is a CPU-only build, installs the CUDA build of the
   same torch version (:func:`install_command`; ``TORCH_INDEX_URL`` picks the index) and
   runs again in a fresh process. ``--no-install`` forbids this.
3. Without a CUDA device: writes a "no CUDA device: skipped" report and exits 0.
4. Runs every ``@pytest.mark.cuda`` test (``pytest -m cuda tests``), recording per test
   its outcome, time and peak CUDA memory.
5. Runs ``benchmarks/run.py --device cuda --quick``.
6. Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``: device, torch and CUDA
   versions, tests passed / failed / skipped, every benchmark ratio, peak memory.

Tests and benchmarks run under time limits (:data:`TEST_TIMEOUT_S`, then what is left
of :data:`TOTAL_TIMEOUT_S`), so the whole command ends within 8 minutes after the
installation. Exit status: 0 when every CUDA test passed and every benchmark check
agreed (or when there is no CUDA device), 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ._gpu_plugin import RESULTS_VARIABLE

#: Time limits, in seconds: the tests stop after ``TEST_TIMEOUT_S``; the benchmarks get
#: what the tests left of ``TOTAL_TIMEOUT_S`` and at least ``BENCHMARK_TIMEOUT_S`` (under 8
#: minutes together).
TOTAL_TIMEOUT_S = 450
TEST_TIMEOUT_S = 270
BENCHMARK_TIMEOUT_S = 180
#: Keys of the benchmark results that hold a ratio (besides those under ``ratios``).
RATIO_KEYS = ("speedup", "overhead", "imaml_flatness", "imaml_vs_maml_at_max_T")
SKIPPED = "no CUDA device: skipped"


# ---------------------------------------------------------------------------- the machine
def list_gpus() -> List[str]:
    """The GPUs the NVIDIA driver reports (``nvidia-smi -L``, else ``/proc/driver/nvidia``)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
            gpus = [line.strip() for line in out.splitlines() if line.startswith("GPU")]
            if gpus:
                return gpus
        except (OSError, subprocess.SubprocessError):
            pass
    gpus = []
    for info in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        with open(info) as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("Model")), "NVIDIA GPU")
        gpus.append(model)
    return gpus


def probe(gpus: Optional[List[str]] = None) -> Dict[str, Any]:
    """What the report needs to know about the machine and torch."""
    available = torch.cuda.is_available()
    env: Dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": available,
        "gpus_seen_by_driver": list_gpus() if gpus is None else gpus,
        "devices": [],
    }
    try:
        from implicitgrad import __version__

        env["implicitgrad"] = __version__
    except ImportError:
        env["implicitgrad"] = None
    if available:
        env["cudnn"] = torch.backends.cudnn.version()
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            env["devices"].append({"name": props.name, "memory_gib": props.total_memory / 2**30,
                                   "capability": f"{props.major}.{props.minor}"})
    return env


def needs_cuda_build(env: Dict[str, Any]) -> bool:
    """A GPU is present but torch was built without CUDA."""
    return env["torch_cuda"] is None and bool(env["gpus_seen_by_driver"])


def install_command(torch_version: str, index_url: Optional[str] = None) -> List[str]:
    """``pip install --force-reinstall torch==VERSION``: the CUDA build of the same release.

    On Linux, PyPI's torch wheel is the CUDA build; ``index_url`` (e.g.
    ``https://download.pytorch.org/whl/cu126``) picks another CUDA version.
    """
    command = [sys.executable, "-m", "pip", "install", "--force-reinstall", f"torch=={torch_version.split('+')[0]}"]
    return command + (["--index-url", index_url] if index_url else [])


# ---------------------------------------------------------------------------- the steps
def _run_logged(command: Sequence[str], cwd: Path, log: Path, timeout: float,
                env: Optional[Dict[str, str]] = None) -> Tuple[Optional[int], float]:
    """Run ``command``, copying its output to the console and to ``log``. Returns its exit
    status (``None`` when it ran out of time and was stopped) and the seconds it took."""
    start = time.perf_counter()
    with open(log, "w") as sink:
        sink.write("$ " + " ".join(command) + "\n")
        proc = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)

        def copy() -> None:
            for line in proc.stdout or ():
                sys.stdout.write(line)
                sink.write(line)

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            status: Optional[int] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = None
        reader.join(timeout=10)
    return status, time.perf_counter() - start


def run_tests(root: Path, out: Path, timeout: float = TEST_TIMEOUT_S,
              selection: Sequence[str] = ("tests", "-m", "cuda")) -> Dict[str, Any]:
    """Run the selected tests with the recording plugin; their records and a summary."""
    results = out / "tests.json"
    results.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", *selection, "-p", "implicitgrad.testing._gpu_plugin",
               "-p", "no:cacheprovider", "-q", "-rfEs"]
    env = dict(os.environ, **{RESULTS_VARIABLE: str(results)})
    status, seconds = _run_logged(command, root, out / "tests.log", timeout, env)
    records = json.loads(results.read_text())["tests"] if results.exists() else []
    counts = {k: sum(r["outcome"] == k for r in records) for k in ("passed", "failed", "skipped")}
    peaks = [r["peak_memory_mib"] for r in records if r.get("peak_memory_mib") is not None]
    return {"command": " ".join(command[1:]), "exit_status": status, "timed_out": status is None,
            "seconds": seconds, "counts": counts, "records": records,
            "peak_memory_mib": max(peaks) if peaks else None,
            "ok": status == 0 and counts["failed"] == 0 and counts["passed"] > 0}


def benchmark_ratios(results: Dict[str, Any]) -> Dict[str, float]:
    """Every ratio in a ``benchmarks/run.py`` JSON: the entries under ``ratios`` and
    ``best_ratios``, and the keys of :data:`RATIO_KEYS`, by their path."""
    found: Dict[str, float] = {}

    def walk(node: Any, path: Tuple[str, ...], is_ratio: bool) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, path + (str(key),), is_ratio or key in ("ratios", "best_ratios") or key in RATIO_KEYS)
        elif is_ratio and isinstance(node, (int, float)) and not isinstance(node, bool):
            found["/".join(path)] = float(node)

    walk({k: v for k, v in results.items() if k != "checks"}, (), False)
    return found


def benchmark_peaks(results: Dict[str, Any]) -> Dict[str, float]:
    """Peak memory (MiB) per method and inner-step count from the memory section."""
    memory = results.get("memory") or {}
    return {f"{method} T={steps}": float(mib) for method, per_t in memory.get("peak_mib", {}).items()
            for steps, mib in per_t.items()}


def run_benchmarks(root: Path, out: Path, timeout: float = BENCHMARK_TIMEOUT_S) -> Dict[str, Any]:
    """``benchmarks/run.py --device cuda --quick``: its ratios, peak memory and checks."""
    folder = out / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "benchmarks.json"
    path.unlink(missing_ok=True)
    command = [sys.executable, "benchmarks/run.py", "--device", "cuda", "--quick", "--out", str(folder),
               "--json", str(path)]
    status, seconds = _run_logged(command, root, out / "benchmarks.log", timeout)
    results = json.loads(path.read_text()) if path.exists() else {}
    return {"command": " ".join(["python"] + command[1:]), "exit_status": status, "timed_out": status is None,
            "seconds": seconds, "ratios": benchmark_ratios(results), "peak_memory_mib": benchmark_peaks(results),
            "checks_ok": results.get("checks_ok"), "ok": status == 0 and bool(results.get("checks_ok"))}


# ---------------------------------------------------------------------------- the report
def markdown(report: Dict[str, Any]) -> str:
    """The report as markdown."""
    env = report["environment"]
    devices = ", ".join(f"{d['name']} ({d['memory_gib']:.1f} GiB, compute capability {d['capability']})"
                        for d in env["devices"]) or "none"
    lines = ["# implicitgrad GPU check", "", f"**{report['summary']}**", ""]
    if report.get("reason"):
        lines += [report["reason"], ""]
    lines += ["| | |", "|---|---|", f"| CUDA devices (torch) | {devices} |",
              f"| GPUs seen by the driver | {', '.join(env['gpus_seen_by_driver']) or 'none'} |",
              f"| torch | {env['torch']} |",
              f"| torch built with CUDA | {env['torch_cuda'] or 'no (CPU-only build)'} |",
              f"| cuDNN | {env.get('cudnn') or '-'} |", f"| implicitgrad | {env['implicitgrad']} |",
              f"| Python | {env['python']} |", f"| date | {report['date']} |",
              f"| total time | {report['elapsed_s']:.0f} s |", ""]
    tests = report.get("tests")
    if tests:
        c = tests["counts"]
        state = f"stopped after {tests['seconds']:.0f} s (time limit)" if tests["timed_out"] else \
            f"{tests['seconds']:.0f} s"
        peak = tests["peak_memory_mib"]
        lines += ["## CUDA tests", "", f"`python -m {tests['command']}`: {c['passed']} passed, {c['failed']} failed, "
                  f"{c['skipped']} skipped ({state}); largest peak memory of a test: "
                  + (f"{peak:.1f} MiB." if peak is not None else "not measured."),
                  "", "| test | outcome | time | peak memory | recorded |", "|---|---|---|---|---|"]
        for r in tests["records"]:
            peak = "-" if r.get("peak_memory_mib") is None else f"{r['peak_memory_mib']:.1f} MiB"
            props = "; ".join(f"{k} = {_fmt(v)}" for k, v in r["properties"].items())
            lines.append(f"| `{r['test']}` | {r['outcome']} | {r['duration_s']:.2f} s | {peak} | {props} |")
        lines.append("")
        for r in tests["records"]:
            if r["outcome"] != "passed" and r["detail"]:
                lines += [f"**{r['outcome']}: `{r['test']}`**", "", "```", r["detail"], "```", ""]
    bench = report.get("benchmarks")
    if bench:
        state = "stopped (time limit)" if bench["timed_out"] else f"exit status {bench['exit_status']}"
        checks = {True: "all agree", False: "FAILED", None: "not reached"}[bench["checks_ok"]]
        lines += ["## Benchmarks", "", f"`{bench['command']}`: {state}, {bench['seconds']:.0f} s; "
                  f"gradient-agreement checks: {checks}.", "", "| ratio | value |", "|---|---|"]
        lines += [f"| {name} | {value:.3g} |" for name, value in bench["ratios"].items()]
        lines += ["", "| peak memory (one meta-gradient) | MiB |", "|---|---|"]
        lines += [f"| {name} | {mib:.1f} |" for name, mib in bench["peak_memory_mib"].items()]
        lines.append("")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(report: Dict[str, Any], out: Path) -> Tuple[Path, Path]:
    """``OUT/gpu_check.json`` and ``OUT/gpu_check.md``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    md_path.write_text(markdown(report))
    return json_path, md_path


# ---------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m implicitgrad.testing.gpu_check",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check", help="folder of the reports (default: runs/gpu_check)")
    parser.add_argument("--root", default=None, help="source checkout holding tests/ and benchmarks/ "
                        "(default: the one this module belongs to)")
    parser.add_argument("--no-install", action="store_true", help="never install the CUDA build of torch")
    parser.add_argument("--skip-benchmarks", action="store_true", help="run the CUDA tests only")
    return parser.parse_args(argv)


def _root(given: Optional[str]) -> Path:
    root = Path(given) if given else Path(__file__).resolve().parents[2]
    if not (root / "tests").is_dir() or not (root / "benchmarks" / "run.py").is_file():
        raise SystemExit(f"gpu_check: {root} holds no tests/ and benchmarks/run.py; run it from a source checkout "
                         "of implicitgrad or pass --root.")
    return root


def main(argv: Optional[Sequence[str]] = None, gpus: Optional[List[str]] = None) -> int:
    """Run the check; return the exit status (``gpus`` overrides the driver probe)."""
    args = parse_args(argv)
    start = time.perf_counter()
    root = _root(args.root)
    out = Path(args.out)
    if not out.is_absolute():
        out = root / out
    out.mkdir(parents=True, exist_ok=True)
    env = probe(gpus)
    report: Dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                              "command": "python -m implicitgrad.testing.gpu_check " + " ".join(argv or sys.argv[1:]),
                              "environment": env, "tests": None, "benchmarks": None, "reason": ""}
    status = 0
    if needs_cuda_build(env):
        command = install_command(env["torch"], os.environ.get("TORCH_INDEX_URL"))
        if args.no_install:
            report["summary"] = "not run: torch is a CPU-only build"
            report["reason"] = (f"GPUs are present ({', '.join(env['gpus_seen_by_driver'])}) but torch {env['torch']} "
                                f"was built without CUDA. Install the CUDA build: `{' '.join(command[2:])}`.")
            status = 1
        else:
            print("gpu_check: installing the CUDA build of torch:", " ".join(command), flush=True)
            installed, seconds = _run_logged(command, root, out / "install.log", timeout=1800)
            if installed != 0:
                report["summary"] = "not run: installing the CUDA build of torch failed"
                report["reason"] = f"`{' '.join(command)}` failed; see {out / 'install.log'}."
                status = 1
            else:
                again = [sys.executable, "-m", "implicitgrad.testing.gpu_check", *(argv or sys.argv[1:]),
                         "--no-install"]
                return subprocess.run(again, cwd=root, check=False).returncode
    elif not env["cuda_available"]:
        report["summary"] = SKIPPED
        build = f"built with CUDA {env['torch_cuda']}" if env["torch_cuda"] else "a CPU-only build"
        report["reason"] = (f"torch.cuda.is_available() is False (torch {env['torch']}, {build}; GPUs seen by "
                            f"the driver: {', '.join(env['gpus_seen_by_driver']) or 'none'}). Nothing was run.")
    else:
        report["tests"] = run_tests(root, out)
        if not args.skip_benchmarks:
            left = max(BENCHMARK_TIMEOUT_S, TOTAL_TIMEOUT_S - report["tests"]["seconds"])
            report["benchmarks"] = run_benchmarks(root, out, timeout=left)
        ok = report["tests"]["ok"] and (report["benchmarks"] is None or report["benchmarks"]["ok"])
        report["summary"] = "passed" if ok else "FAILED"
        status = 0 if ok else 1
    report["elapsed_s"] = time.perf_counter() - start
    json_path, md_path = write_report(report, out)
    print(f"gpu_check: {report['summary']}. {report['reason']}".rstrip())
    print(f"gpu_check: wrote {json_path} and {md_path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
