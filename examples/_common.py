"""Shared plumbing of the example scripts: command line, seeding, device, progress, outputs.

Every script in ``examples/`` follows one contract: it runs from the repository root, accepts
``--quick`` (a small run that still shows the effect; its help says how long it takes),
``--json PATH`` (final metrics), ``--seed``, ``--device cpu|cuda`` and ``--out DIR`` (where
figures go, default ``runs/<script name>/``), shows progress with tqdm and saves a PNG figure. ``--threads N``
sets PyTorch's CPU threads. A script uses this module as follows::

    from _common import example_parser, parse_args, progress, pyplot, save_figure, write_json

    def main(argv=None):
        parser = example_parser(__file__, "What the example shows.")
        parser.add_argument("--steps", type=int, default=None)   # script-specific options
        parser.set_defaults(threads=1)                           # optional: tiny problems
        args = parse_args(parser, argv)   # seeds everything, resolves args.device, creates args.out
        bar = progress(range(100), desc="outer steps")
        for step in bar:
            loss = ...
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)   # refresh=False: keeps logs short
        fig, ax = pyplot().subplots()
        save_figure(fig, args.out, "figure.png")
        metrics = {"metric": 0.5}
        write_json(args.json, metrics)   # no-op without --json
        return metrics

    if __name__ == "__main__":
        main()

``main(argv)`` returning the metrics lets tests run the quick mode in-process. Running
``python examples/<script>.py`` puts ``examples/`` on ``sys.path``, so ``import _common``
works without installing anything; tests add that directory to ``sys.path`` themselves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "example_parser",
    "parse_args",
    "print_summary",
    "progress",
    "pyplot",
    "resolve_device",
    "save_figure",
    "seed_everything",
    "split_indices",
    "standardize",
    "write_json",
]


def example_parser(script: str, description: str, quick_time: Optional[str] = None) -> argparse.ArgumentParser:
    """An argument parser with the options every example accepts.

    Args:
        script: the script's ``__file__``; its stem names the default output directory
            ``runs/<stem>/``.
        description: one or two sentences on what the example shows (printed by ``--help``).
        quick_time: how long ``--quick`` takes, as measured (e.g. ``"about 30 s on one CPU core"``);
            shown in the help of ``--quick``.

    Returns:
        A parser with ``--quick``, ``--json PATH``, ``--seed``, ``--device``, ``--out DIR`` and
        ``--threads``; add script-specific options to it (or change defaults with
        ``parser.set_defaults``), then call :func:`parse_args`.
    """
    stem = Path(script).stem
    parser = argparse.ArgumentParser(
        prog=f"python examples/{stem}.py",
        description=description,
        formatter_class=_HelpFormatter,
    )
    quick = "small run that still shows the effect, used by the tests"
    parser.add_argument("--quick", action="store_true", help=f"{quick} ({quick_time})" if quick_time else quick)
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="write the final metrics to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="seed of Python, NumPy and PyTorch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", metavar="DIR", default=str(Path("runs") / stem),
                        help="directory for the PNG figures")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of PyTorch; unset, PyTorch chooses (small problems run "
                             "fastest on 1, especially on a busy machine)")
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends \"(default: X)\" to an option's help unless the help already states its default.

    Options whose default is ``None`` or ``False`` (unset, or a flag) get no suffix: their
    help says what happens without them.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses ``argv``, seeds every generator, resolves the device and creates the output directory.

    Also applies ``--threads`` (``torch.set_num_threads``) when given.

    Args:
        parser: a parser from :func:`example_parser`, possibly with extra options.
        argv: the arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The namespace, with ``device`` a :class:`torch.device` and ``out`` a :class:`~pathlib.Path`
        that exists.

    Raises:
        SystemExit: through ``parser.error`` for an unusable ``--device`` (such as ``cuda``
            on a machine without a CUDA device), a negative ``--seed`` or ``--threads`` below 1,
            with the message.
    """
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be a non-negative integer, got {args.seed}.")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be a positive integer, got {args.threads}.")
        torch.set_num_threads(args.threads)
    try:
        args.device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    seed_everything(args.seed)
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def resolve_device(name: str) -> torch.device:
    """The :class:`torch.device` called ``name``, checked to exist on this machine.

    Raises:
        ValueError: ``name`` is not a device, or names a CUDA device that is not available.
    """
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N ({error}).") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(
                f"--device {name} was requested but no CUDA device is available (torch {torch.__version__}, "
                f"{build}). Run with --device cpu, or install a CUDA build of PyTorch on a machine with a GPU."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible; "
                f"use an index below {torch.cuda.device_count()}."
            )
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: the examples run on cpu or cuda only.")
    return device


def seed_everything(seed: int) -> None:
    """Seeds Python's ``random``, NumPy's global generator and PyTorch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def progress(iterable: Iterable, desc: str, total: Optional[int] = None, **kwargs: Any):
    """A tqdm progress bar on standard error (``leave=False`` so the final summary stays readable).

    When standard error is not a terminal (a log file, a test), the bar is redrawn at most every
    5 seconds instead of 10 times a second, so logs stay short.
    """
    from tqdm.auto import tqdm

    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 5.0)
    return tqdm(iterable, desc=desc, total=total, **kwargs)


def split_indices(n: int, sizes: Sequence[int], seed: int) -> Tuple[np.ndarray, ...]:
    """A random partition of ``range(n)`` into consecutive parts of the given sizes.

    Args:
        n: number of examples.
        sizes: the size of each part; a final ``-1`` takes the rest.
        seed: seed of the permutation (independent of the global generators).

    Raises:
        ValueError: the sizes need more than ``n`` examples or are not positive.
    """
    sizes = list(sizes)
    if sizes and sizes[-1] == -1:
        sizes[-1] = n - sum(sizes[:-1])
    if any(s < 1 for s in sizes) or sum(sizes) > n:
        raise ValueError(f"split_indices: sizes {list(sizes)} must be positive and sum to at most n={n}.")
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0] + sizes)
    return tuple(order[a:b] for a, b in zip(bounds[:-1], bounds[1:]))


def standardize(train: np.ndarray, *others: np.ndarray) -> Tuple[np.ndarray, ...]:
    """Centres and scales every column by the training part's mean and standard deviation.

    Constant training columns are only centred. Using the training statistics alone keeps
    validation and test data unseen.
    """
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return tuple((a - mean) / std for a in (train, *others))


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend (the scripts only write files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, name: str) -> Path:
    """Saves ``fig`` as ``out/name`` (PNG, 150 dpi), closes it and returns the path."""
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    pyplot().close(fig)
    return path


def write_json(path: Optional[str], metrics: Mapping[str, Any]) -> Optional[Path]:
    """Writes ``metrics`` as indented JSON to ``path`` (atomically); does nothing if ``path`` is None.

    Tensors, NumPy scalars and arrays become numbers and lists; non-finite floats become
    ``null`` so that the file is strict JSON.

    Raises:
        TypeError: a value that is not a number, string, bool, None, sequence, mapping, tensor or array.
    """
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(metrics), indent=2, sort_keys=True) + "\n"
    # A crash mid-write must not leave a truncated file that a test or a plot script reads.
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise TypeError(f"write_json: cannot store a value of type {type(value).__name__} ({value!r}).")


def print_summary(title: str, rows: Sequence[Tuple[str, Any]], notes: Sequence[str] = ()) -> None:
    """Prints a titled block of aligned ``label: value`` rows, then free-text notes.

    Floats are shown with 4 significant digits unless already formatted as strings.
    """
    width = max((len(label) for label, _ in rows), default=0)
    lines = ["", title, "=" * len(title)]
    for label, value in rows:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"  {label.ljust(width)}  {shown}")
    lines.extend(notes)
    print("\n".join(lines), flush=True)
