"""pytest plugin of :mod:`implicitgrad.testing.gpu_check`: one record per test.

Loaded with ``-p implicitgrad.testing._gpu_plugin``; it writes, to the path in the
environment variable ``IMPLICITGRAD_GPU_CHECK_RESULTS``, a JSON list with per test its
node id, outcome (``passed``, ``failed``, ``skipped``), duration, the skip reason or the
failure's last lines, the properties it recorded (``record_property``) and, on CUDA, the
peak memory allocated during the test (``torch.cuda.max_memory_allocated`` after a reset
at its setup).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch

RESULTS_VARIABLE = "IMPLICITGRAD_GPU_CHECK_RESULTS"
_records: Dict[str, Dict[str, Any]] = {}


def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def pytest_runtest_setup(item: Any) -> None:
    if _cuda():
        torch.cuda.reset_peak_memory_stats()


def pytest_runtest_logreport(report: Any) -> None:
    record = _records.setdefault(report.nodeid, {"test": report.nodeid, "outcome": "passed", "duration_s": 0.0,
                                                 "detail": "", "properties": {}, "peak_memory_mib": None})
    record["duration_s"] += report.duration
    record["properties"].update({str(k): v for k, v in report.user_properties})
    if report.failed:
        record["outcome"] = "failed"
        record["detail"] = "\n".join(str(report.longrepr).splitlines()[-15:])
    elif report.skipped and record["outcome"] != "failed":
        record["outcome"] = "skipped"
        longrepr = report.longrepr
        reason = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
        record["detail"] = reason.removeprefix("Skipped: ")
    if report.when == "call" and _cuda():
        record["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    # Written after every test: a run stopped at its time limit keeps what it finished.
    _write(None)


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    _write(int(exitstatus))


def _write(exitstatus: Optional[int]) -> None:
    path = os.environ.get(RESULTS_VARIABLE)
    if path:
        with open(path, "w") as f:
            json.dump({"exitstatus": exitstatus, "tests": list(_records.values())}, f, indent=1, default=str)
