r"""Count the host synchronisations of a computation and hold them to a budget.

A GPU runs its kernels asynchronously; reading a value back to the host (``bool(t)``,
``float(t)``, ``t.item()``, ``t.tolist()``, a copy to the CPU) waits until every queued
kernel has finished. An iterative solver that reads its residual at every iteration
therefore runs at the pace of the host. implicitgrad's solvers read it only every
``check_every`` iterations, so a solve of ``k`` iterations should synchronise at most

.. math::

    \lceil k / \text{check\_every} \rceil + c

times, ``c`` a constant per call (the first check, the final status, the forward
residual). :func:`count_syncs` counts them; :func:`assert_sync_budget` holds the count to
that bound and lists where the synchronisations happened when it is exceeded.

Two sources of counts:

* :func:`cuda_sync_debug_mode` (on CUDA): ``torch.cuda.set_sync_debug_mode("warn")``
  makes torch warn at every synchronising CUDA call (device-to-host copies, stream
  synchronisations, pageable host-to-device copies); the warnings are counted.
* :func:`host_reads` (any device): a stand-in that emits the same warning whenever a
  tensor's value is read into Python (``item``, ``tolist``, ``bool``, ``float``, ``int``,
  ``index``). It sees the reads written in Python — on CUDA each of them is a
  synchronisation — but not those inside torch's C++ operators; it exists so that the
  counting and the budget can be tested without a GPU.

Example:
    >>> import torch
    >>> from implicitgrad.testing.syncs import count_syncs, host_reads
    >>> with count_syncs(host_reads) as syncs:
    ...     t = torch.ones(3)
    ...     _ = float(t.sum()) + t.max().item()
    >>> syncs.count
    2
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import warnings
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional

import torch

__all__ = [
    "SYNC_WARNING",
    "SyncCount",
    "assert_sync_budget",
    "count_syncs",
    "cuda_sync_debug_mode",
    "host_reads",
    "sync_budget",
]

#: The text of the warning torch issues at a synchronising CUDA call in sync debug mode
#: "warn" (``c10::cuda::warn_or_error_on_sync``); :func:`host_reads` issues it too.
SYNC_WARNING = "called a synchronizing CUDA operation"

#: Tensor methods through which Python reads a value to the host.
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@dataclasses.dataclass
class SyncCount:
    """The synchronisations seen inside a :func:`count_syncs` block.

    Attributes:
        sites: one ``"file:line"`` per synchronisation, in order (the Python line that
            made the synchronising call; for a backward pass run by the autograd engine's
            device thread, the line that started the backward pass).
    """

    sites: List[str] = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        """How many synchronisations the block made."""
        return len(self.sites)

    def summary(self, limit: int = 10) -> str:
        """The most frequent sites with their counts, one per line."""
        if not self.sites:
            return "no synchronisations"
        common = collections.Counter(self.sites).most_common(limit)
        lines = [f"{n:5d} × {site}" for site, n in common]
        rest = len(set(self.sites)) - len(common)
        if rest > 0:
            lines.append(f"      ... and {rest} more sites")
        return "\n".join(lines)


def sync_budget(iterations: int, check_every: int, per_call: int) -> int:
    """The largest number of synchronisations allowed: ``⌈iterations / check_every⌉ + per_call``.

    Args:
        iterations: iterations the solve ran.
        check_every: iterations between the solver's convergence checks (at least 1).
        per_call: the constant allowed per call, for checks that do not repeat.

    Raises:
        ValueError: a negative count or ``check_every < 1``.
    """
    if iterations < 0 or per_call < 0:
        raise ValueError(f"iterations and per_call must be non-negative, got {iterations} and {per_call}.")
    if check_every < 1:
        raise ValueError(f"check_every must be at least 1, got {check_every}.")
    return math.ceil(iterations / check_every) + per_call


def assert_sync_budget(syncs: SyncCount, *, iterations: int, check_every: int, per_call: int,
                       what: str = "the computation") -> None:
    """Raise ``AssertionError`` when ``syncs`` exceeds :func:`sync_budget`, naming the sites.

    Args:
        syncs: the count of a :func:`count_syncs` block.
        iterations, check_every, per_call: as in :func:`sync_budget`.
        what: a description of the counted computation, for the message.
    """
    budget = sync_budget(iterations, check_every, per_call)
    if syncs.count > budget:
        raise AssertionError(
            f"{what} synchronised with the host {syncs.count} times in {iterations} iterations; "
            f"the budget is ⌈{iterations}/{check_every}⌉ + {per_call} = {budget}. Sites:\n{syncs.summary()}"
        )


@contextlib.contextmanager
def cuda_sync_debug_mode() -> Iterator[None]:
    """Make torch warn at every synchronising CUDA call inside the block.

    Raises:
        RuntimeError: no CUDA device (nothing could be counted).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_sync_debug_mode needs a CUDA device; count host reads with host_reads instead.")
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@contextlib.contextmanager
def host_reads() -> Iterator[None]:
    """Issue :data:`SYNC_WARNING` at every read of a tensor's value into Python."""
    originals: Dict[str, Any] = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}

    def counted(name: str) -> Callable[..., Any]:
        method = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            warnings.warn(SYNC_WARNING, UserWarning, stacklevel=2)
            return method(self, *args, **kwargs)

        return read

    patched = {name: counted(name) for name in HOST_READS}
    try:
        for name, read in patched.items():
            setattr(torch.Tensor, name, read)
        yield
    finally:
        for name, original in originals.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def count_syncs(source: Optional[Callable[[], ContextManager[Any]]] = None) -> Iterator[SyncCount]:
    """Count the synchronisations made inside the block.

    Args:
        source: a context-manager factory that makes each synchronisation issue a
            ``UserWarning`` with :data:`SYNC_WARNING`; default :func:`cuda_sync_debug_mode`.

    Yields:
        A :class:`SyncCount`, filled when the block ends. Other warnings issued in the
        block are issued again after it, under the filters in force outside.
    """
    result = SyncCount()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with (source or cuda_sync_debug_mode)():
                yield result
        finally:
            others = []
            for w in caught:
                if isinstance(w.message, Warning) and SYNC_WARNING in str(w.message):
                    result.sites.append(f"{w.filename}:{w.lineno}")
                else:
                    others.append(w)
    for w in others:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
