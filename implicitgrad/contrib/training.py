"""Atomic checkpoints and a training loop that resumes bit for bit.

A checkpoint holds everything a step may depend on: the ``state_dict`` of each stateful
object (model, optimizer, scheduler...), the global random states (torch CPU and CUDA,
numpy, Python ``random``), named generators, the number of completed steps and a history
of metrics. Everything is stored as tensors and plain Python values, so
``torch.load(path, weights_only=True)`` reads it without unpickling arbitrary objects.

Every checkpoint also stores a digest of its content, so a damaged file (truncated, empty,
bit-flipped) is recognised on loading, with an error that names the file, instead of
loading wrong numbers. :func:`run_training` keeps the last two checkpoints
(``path`` and ``path.prev``) and resumes from the previous one, with a warning, when the
latest is damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import numbers
import os
import pickle
import random
import secrets
import shutil
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from .._diagnostics import user_stacklevel

__all__ = [
    "CheckpointError",
    "capture_rng_state",
    "load_checkpoint",
    "previous_path",
    "restore_rng_state",
    "run_training",
    "save_checkpoint",
]

PathLike = Union[str, os.PathLike]
CHECKPOINT_FORMAT = "implicitgrad.training/1"
_NDARRAY = "__ndarray__"
#: Key of the content digest stored in every checkpoint (removed again on loading).
_DIGEST = "__implicitgrad_digest__"
#: What a damaged file raises inside ``torch.load``.
_LOAD_ERRORS = (
    RuntimeError, EOFError, OSError, UnicodeDecodeError, pickle.UnpicklingError, ValueError,
    KeyError, IndexError, TypeError, AttributeError, zipfile.BadZipFile,
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: damaged, or not a checkpoint dictionary.

    Attributes:
        damaged: whether the file is damaged (truncated, empty, corrupted), as opposed to
            a readable file that is not a checkpoint.
    """

    def __init__(self, message: str, damaged: bool = False) -> None:
        super().__init__(message)
        self.damaged = damaged


def previous_path(path: PathLike) -> Path:
    """Where the checkpoint before the latest one is kept: ``path`` + ``".prev"``."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def _keep_previous(path: Path) -> None:
    """Makes ``path.prev`` a copy of the checkpoint at ``path`` (a hard link where the file
    system allows), so that the last two checkpoints survive the next save."""
    if not path.is_file():
        return
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        try:
            os.link(path, temporary)
        except OSError:
            shutil.copy2(path, temporary)
        os.replace(temporary, previous_path(path))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _remove_stale_temporaries(path: Path) -> None:
    """Deletes temporary files that saves to ``path`` killed mid-write left behind."""
    with contextlib.suppress(OSError):
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()


def _digest(value: Any) -> str:
    """A hash of the content: tensors by dtype, shape and bytes, plain values by type and repr."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, value)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        t = t.to_dense() if t.layout != torch.strided else t
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _feed(h, item)
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def save_checkpoint(path: PathLike, state: Mapping[str, Any]) -> None:
    """Writes ``state`` with :func:`torch.save` atomically.

    The bytes go to a temporary file in the destination folder, are flushed and fsynced,
    and the file then replaces ``path`` with :func:`os.replace`. A crash or an exception
    at any point leaves either the previous checkpoint or the new one, never a truncated
    file; temporary files left by saves that were killed are removed. Missing parent
    folders are created. The file's mode follows the umask, as for :func:`torch.save`
    (``0o644`` under umask ``022``). A digest of the content is stored with it, so that
    :func:`load_checkpoint` recognises a damaged file.

    Args:
        path: Destination file.
        state: What to save; keep to tensors and plain Python values (dict, list, tuple,
            str, int, float, bool, None) so that :func:`load_checkpoint` can read it.

    Raises:
        OSError: If the file cannot be written; the temporary file is removed first.

    Example:
        >>> import os, tempfile, torch
        >>> from implicitgrad.training import load_checkpoint, save_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "run", "last.pt")
        >>> save_checkpoint(path, {"step": 3, "weight": torch.ones(2)})
        >>> load_checkpoint(path)["step"]
        3
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    payload = dict(state)
    payload[_DIGEST] = _digest(dict(state))
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # 0o666 before the umask, as open() and torch.save give (mkstemp would give 0o600).
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # Make the rename itself durable; directories cannot be opened this way on Windows.
    with contextlib.suppress(OSError):
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def load_checkpoint(
    path: PathLike, map_location: str | torch.device | None = None
) -> dict[str, Any]:
    """Reads a checkpoint with ``torch.load(path, weights_only=True)``.

    Args:
        path: A file written by :func:`save_checkpoint`.
        map_location: Passed to :func:`torch.load`, e.g. ``"cpu"``.

    Returns:
        The saved dictionary.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CheckpointError: If the file is damaged (truncated, empty, or its content differs
            from the digest saved with it), or holds something other than a dictionary
            (e.g. a tensor or a list saved with :func:`torch.save`).

    Example:
        >>> from implicitgrad.training import load_checkpoint
        >>> state = load_checkpoint("runs/sinusoid.pt")  # doctest: +SKIP
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {os.fspath(path)!r}.")
    name = os.fspath(path)
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=True)
    except _LOAD_ERRORS as error:
        raise CheckpointError(
            f"the checkpoint {name!r} is damaged (truncated, empty or corrupted) and cannot be "
            f"read: {type(error).__name__}: {error}. Resume from an earlier copy "
            f"(run_training keeps the previous one as {os.fspath(previous_path(path))!r}).",
            damaged=True,
        ) from error
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"{name!r} holds a {type(loaded).__name__}, not a checkpoint: save_checkpoint and "
            "run_training write a dictionary. Point to a checkpoint file they wrote."
        )
    digest = loaded.pop(_DIGEST, None)
    if digest is not None and digest != _digest(loaded):
        raise CheckpointError(
            f"the checkpoint {name!r} is damaged: its content does not match the digest saved "
            f"with it (bits changed on disk or in transfer). Resume from an earlier copy "
            f"(run_training keeps the previous one as {os.fspath(previous_path(path))!r}).",
            damaged=True,
        )
    return loaded


def _encode(value: Any) -> Any:
    """Makes numpy arrays and scalars loadable with ``weights_only=True``."""
    if isinstance(value, np.ndarray):
        stored = value.astype(np.int64) if value.dtype.kind in "iub" else value
        return {_NDARRAY: torch.from_numpy(np.array(stored)), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_encode(item) for item in value)
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if _NDARRAY in value:
            return value[_NDARRAY].cpu().numpy().astype(np.dtype(value["dtype"]))
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_decode(item) for item in value)
    return value


def _generator_state(name: str, generator: Any) -> Any:
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    if isinstance(generator, np.random.Generator):
        return _encode(generator.bit_generator.state)
    if isinstance(generator, random.Random):
        version, internal, gauss_next = generator.getstate()
        return {"version": version, "internal": list(internal), "gauss_next": gauss_next}
    raise TypeError(
        f"generators[{name!r}] is a {type(generator).__name__}; pass a torch.Generator, a "
        f"numpy.random.Generator or a random.Random."
    )


def _set_generator_state(generator: Any, state: Any) -> None:
    if isinstance(generator, torch.Generator):
        generator.set_state(state.cpu())
    elif isinstance(generator, np.random.Generator):
        generator.bit_generator.state = _decode(state)
    else:
        generator.setstate((state["version"], tuple(state["internal"]), state["gauss_next"]))


def capture_rng_state(generators: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Returns the global random states and those of ``generators``, ready to save.

    Covers the torch CPU RNG, every CUDA device's RNG when CUDA is available, numpy's global
    RNG and Python's ``random``; numpy arrays are stored as tensors so that the result loads
    with ``weights_only=True``.

    Args:
        generators: Named ``torch.Generator``, ``numpy.random.Generator`` or
            ``random.Random`` objects that the computation draws from.

    Returns:
        A dictionary for :func:`restore_rng_state`.

    Raises:
        TypeError: If a generator is of another type.

    Example:
        >>> import torch
        >>> from implicitgrad.training import capture_rng_state, restore_rng_state
        >>> state = capture_rng_state()
        >>> first = torch.rand(2)
        >>> restore_rng_state(state)
        >>> torch.equal(torch.rand(2), first)
        True
    """
    generators = dict(generators or {})
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _encode(np.random.get_state(legacy=False)),
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "generators": {name: _generator_state(name, g) for name, g in generators.items()},
    }


def restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, Any] | None = None
) -> None:
    """Restores random states captured by :func:`capture_rng_state`.

    Args:
        state: The dictionary returned by :func:`capture_rng_state` (possibly saved and
            loaded again).
        generators: The same named generators as at capture time; each is set in place.

    Raises:
        ValueError: If the generator names differ from those captured.
        TypeError: If a generator is of an unsupported type.

    Warns:
        UserWarning: If the state holds CUDA RNG states for another number of devices; the
            CUDA RNGs are then left as they are.
    """
    generators = dict(generators or {})
    saved = state["generators"]
    if set(saved) != set(generators):
        raise ValueError(
            f"the checkpoint holds generators {sorted(saved)} but {sorted(generators)} were "
            f"passed; pass the same names as when it was saved."
        )
    for name, generator in generators.items():
        _generator_state(name, generator)
        _set_generator_state(generator, saved[name])
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = list(state["cuda"])
    if cuda_states:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        else:
            warnings.warn(
                f"the checkpoint holds CUDA RNG states for {len(cuda_states)} devices but "
                f"{torch.cuda.device_count()} are visible; CUDA random numbers will differ "
                f"from the uninterrupted run.",
                stacklevel=user_stacklevel(),
            )
    np.random.set_state(_decode(state["numpy"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has key {key!r}; history keys must be strings.")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}; history must hold only dicts, lists, tuples, "
        f"str, int, float, bool and None (convert tensors with .item() or .tolist())."
    )


def _plain_metric(name: Any, value: Any, history: dict[str, Any]) -> Any:
    if not isinstance(name, str):
        raise TypeError(f"metric names must be strings, got {name!r}.")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {name!r} has {value.numel()} elements; return one number.")
        value = value.item()
    elif isinstance(value, (np.ndarray, np.generic)):
        if value.size != 1:
            raise TypeError(f"metric {name!r} has {value.size} elements; return one number.")
        value = value.item()
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
    elif not (isinstance(value, (bool, str)) or value is None):
        raise TypeError(
            f"metric {name!r} is a {type(value).__name__}; return a real number or a string."
        )
    if not isinstance(history.setdefault(name, []), list):
        raise TypeError(
            f"history[{name!r}] is a {type(history[name]).__name__}; metrics returned by "
            f"step_fn are appended to lists, so rename the metric or the history entry."
        )
    return value


def _check_state_objects(state_objects: Mapping[str, Any]) -> None:
    for name, obj in state_objects.items():
        if not (callable(getattr(obj, "state_dict", None)) and hasattr(obj, "load_state_dict")):
            raise TypeError(
                f"state_objects[{name!r}] is a {type(obj).__name__} without state_dict() and "
                f"load_state_dict(); pass modules, optimizers, schedulers or similar."
            )


def _progress_bar(enabled: bool, total: int, initial: int, description: str | None) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn(
            "progress=True needs tqdm (`pip install implicitgrad[examples]`); no bar shown.",
            stacklevel=user_stacklevel(),
        )
        return None
    # Redrawn 10 times a second on a terminal, every 5 s into a log file or a pipe.
    interval = 0.1 if sys.stderr.isatty() else 5.0
    return tqdm(total=total, initial=initial, desc=description, dynamic_ncols=True, mininterval=interval)


def run_training(
    step_fn: Callable[[int], Mapping[str, Any] | None],
    num_steps: int,
    *,
    checkpoint_path: PathLike | None = None,
    checkpoint_every: int | None = 100,
    resume: bool = False,
    state_objects: Mapping[str, Any] | None = None,
    generators: Mapping[str, Any] | None = None,
    history: dict[str, Any] | None = None,
    progress: bool = True,
    description: str | None = None,
) -> dict[str, Any]:
    """Calls ``step_fn(step)`` for ``step = 0 .. num_steps-1`` with checkpoints and resumption.

    After each step, the numbers in the mapping ``step_fn`` returns (if any) are appended to
    ``history[name]``; ``step_fn`` may also write to ``history`` itself, e.g. sparse
    evaluation results. A checkpoint is written atomically whenever ``checkpoint_every``
    steps have completed and at the end. With ``resume=True`` and an existing checkpoint,
    every object in ``state_objects``, the global RNGs, ``generators`` and ``history`` are
    restored and the loop continues after the last saved step: as long as the step depends
    only on that state, the run ends bitwise identical to an uninterrupted one. An
    exception (e.g. ``KeyboardInterrupt``) propagates without a checkpoint of the
    half-done step; the next resume repeats the steps since the last checkpoint.

    Args:
        step_fn: Called with the 0-based step index; returns ``None`` or a mapping from
            metric name to a number, one-element tensor or string.
        num_steps: Total number of steps of the run, including those done before a resume.
        checkpoint_path: File to write checkpoints to; ``None`` disables checkpointing.
        checkpoint_every: Steps between checkpoints; ``None`` saves only at the end.
        resume: Restore from ``checkpoint_path`` if the file exists (with a warning and a
            fresh start if it does not).
        state_objects: Named objects with ``state_dict()`` / ``load_state_dict()``: model,
            optimizer, learning-rate scheduler... Use the same names when resuming.
        generators: Named ``torch.Generator``, ``numpy.random.Generator`` or
            ``random.Random`` objects that ``step_fn`` draws from (the global RNGs are
            always saved).
        history: Dictionary of plain values (lists, numbers, strings) to append metrics to;
            updated in place, replaced by the saved one on resume. Default a new dict.
        progress: Show a tqdm progress bar with the latest metrics (no bar if tqdm is
            missing).
        description: Label of the progress bar.

    Returns:
        ``history``.

    Raises:
        TypeError: If an argument has the wrong type, a metric is not a number or string,
            or ``history`` holds values other than plain Python ones.
        ValueError: If a count is out of range or the checkpoint was saved with other
            ``state_objects`` or ``generators`` names.

    Example:
        >>> import torch
        >>> from implicitgrad.training import run_training
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        >>> def step_fn(step):
        ...     x = torch.randn(16, 3)
        ...     loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        ...     optimizer.zero_grad()
        ...     loss.backward()
        ...     optimizer.step()
        ...     return {"loss": loss.item()}
        >>> history = run_training(step_fn, 20, progress=False,
        ...                        state_objects={"model": model, "optimizer": optimizer})
        >>> len(history["loss"])
        20
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__}.")
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}.")
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool)
        or not isinstance(checkpoint_every, numbers.Integral)
        or checkpoint_every < 1
    ):
        raise ValueError(f"checkpoint_every must be an int >= 1 or None, got {checkpoint_every!r}.")
    if not callable(step_fn):
        raise TypeError(f"step_fn must be callable, got {type(step_fn).__name__}.")
    state_objects = dict(state_objects or {})
    generators = dict(generators or {})
    _check_state_objects(state_objects)
    for name, generator in generators.items():
        _generator_state(name, generator)
    history = {} if history is None else history
    if not isinstance(history, dict):
        raise TypeError(f"history must be a dict, got {type(history).__name__}.")

    start = 0
    last_saved: int | None = None
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs a checkpoint_path to resume from.")
    checkpoint = None
    if checkpoint_path is not None:
        _remove_stale_temporaries(Path(checkpoint_path))
        if resume:
            checkpoint = _load_for_resume(checkpoint_path)
    if checkpoint is not None:
        saved = checkpoint["state"]
        if set(saved) != set(state_objects):
            raise ValueError(
                f"the checkpoint holds state_objects {sorted(saved)} but {sorted(state_objects)} "
                f"were passed; pass the same names as when it was saved."
            )
        for name, obj in state_objects.items():
            obj.load_state_dict(saved[name])
        restore_rng_state(checkpoint["rng"], generators)
        history.clear()
        history.update(checkpoint["history"])
        start = last_saved = int(checkpoint["step"])
    elif resume:
        warnings.warn(
            f"no checkpoint at {os.fspath(checkpoint_path)!r}; starting from step 0.",
            stacklevel=user_stacklevel(),
        )

    def save(completed: int) -> None:
        _check_plain(history, "history")
        _keep_previous(Path(checkpoint_path))
        save_checkpoint(
            checkpoint_path,
            {
                "format": CHECKPOINT_FORMAT,
                "step": completed,
                "state": {name: obj.state_dict() for name, obj in state_objects.items()},
                "rng": capture_rng_state(generators),
                "history": history,
            },
        )

    bar = _progress_bar(progress, num_steps, min(start, num_steps), description)
    try:
        for step in range(start, num_steps):
            metrics = step_fn(step)
            if metrics is not None:
                shown = {}
                for name, value in metrics.items():
                    value = _plain_metric(name, value, history)
                    history[name].append(value)
                    shown[name] = value
                if bar is not None:
                    bar.set_postfix(shown, refresh=False)
            if bar is not None:
                bar.update(1)
            completed = step + 1
            if (
                checkpoint_path is not None
                and checkpoint_every
                and completed % checkpoint_every == 0
            ):
                save(completed)
                last_saved = completed
        final = max(start, num_steps)
        if checkpoint_path is not None and last_saved != final:
            save(final)
    finally:
        if bar is not None:
            bar.close()
    return history


_RUN_KEYS = ("format", "step", "state", "rng", "history")


def _load_for_resume(path: PathLike) -> dict[str, Any] | None:
    """The newest usable run_training checkpoint among ``path`` and ``path.prev``.

    A damaged file is reported with a warning naming it and the previous checkpoint is
    tried; ``None`` when neither file exists.

    Raises:
        CheckpointError: both files are damaged, or a file is readable but holds no
            checkpoint dictionary.
        ValueError: a dictionary that run_training did not write.
    """
    damaged = []
    for candidate in (Path(path), previous_path(path)):
        if not candidate.is_file():
            continue
        try:
            checkpoint = load_checkpoint(candidate, map_location="cpu")
        except CheckpointError as error:
            if not error.damaged:
                raise
            damaged.append(os.fspath(candidate))
            warnings.warn(
                f"{error} Trying the previous checkpoint instead.", stacklevel=user_stacklevel()
            )
            continue
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{os.fspath(candidate)!r} was not written by run_training; point "
                f"checkpoint_path to a run_training checkpoint or pass resume=False."
            )
        missing = [key for key in _RUN_KEYS if key not in checkpoint]
        if missing:
            damaged.append(os.fspath(candidate))
            warnings.warn(
                f"the checkpoint {os.fspath(candidate)!r} is damaged: it lacks {missing}. "
                "Trying the previous checkpoint instead.",
                stacklevel=user_stacklevel(),
            )
            continue
        if candidate != Path(path):
            warnings.warn(
                f"resuming from the previous checkpoint {os.fspath(candidate)!r} (step "
                f"{int(checkpoint['step'])}); the steps since are run again.",
                stacklevel=user_stacklevel(),
            )
        return checkpoint
    if damaged:
        raise CheckpointError(
            f"every checkpoint of this run is damaged ({', '.join(map(repr, damaged))}); "
            "there is nothing to resume from. Delete them and start again, or pass "
            "resume=False.",
            damaged=True,
        )
    return None
