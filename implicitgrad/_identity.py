"""Values remembered for particular tensors: the same objects, not modified in place since."""

from __future__ import annotations

import collections
import weakref
from typing import Generic, List, Optional, Sequence, Tuple, TypeVar

import torch

from ._compat import version

V = TypeVar("V")


class ByIdentity(Generic[V]):
    """A value per sequence of tensors, found again only for the very same tensor objects
    whose in-place version (``Tensor._version``, through :func:`._compat.version`) has not
    changed; the least recently used of more than ``size`` entries are dropped. Tensors are
    held by weak references, so an entry never keeps its tensors alive."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: collections.OrderedDict[
            Tuple[int, ...], Tuple[List[weakref.ref[torch.Tensor]], Tuple[Optional[int], ...], V]
        ] = collections.OrderedDict()

    def get(self, tensors: Sequence[torch.Tensor]) -> Optional[V]:
        key = tuple(id(t) for t in tensors)
        entry = self._entries.get(key)
        if entry is None:
            return None
        refs, versions, value = entry
        same = all(ref() is t for ref, t in zip(refs, tensors))
        if not same or None in versions or versions != tuple(version(t) for t in tensors):
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, tensors: Sequence[torch.Tensor], value: V) -> None:
        key = tuple(id(t) for t in tensors)
        self._entries[key] = ([weakref.ref(t) for t in tensors], tuple(version(t) for t in tensors), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
