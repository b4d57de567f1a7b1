"""One way to set a context variable for the duration of a block."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def scoped(var: contextvars.ContextVar[T], value: T) -> Iterator[None]:
    """Within the block, ``var`` holds ``value``; afterwards what it held before."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)
