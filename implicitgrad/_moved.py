"""Former import paths of modules that moved, resolved when imported.

``import implicitgrad.training`` gives :mod:`implicitgrad.contrib.training` itself (the same
module object, so classes and functions are identical), and likewise
``implicitgrad.data`` and its submodules. Nothing is loaded until such a path is imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Dict, Optional, Sequence

#: Former path → current path.
MOVED = {
    "implicitgrad.training": "implicitgrad.contrib.training",
    "implicitgrad.data": "implicitgrad.contrib.data",
}


def current_name(name: str) -> Optional[str]:
    """The current name of a module imported by a former path, ``None`` for any other."""
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


class FormerPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a former path and loads it as the module at its current path."""

    def __init__(self) -> None:
        self._specs: Dict[str, Optional[ModuleSpec]] = {}

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[ModuleType] = None) -> Optional[ModuleSpec]:
        if current_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        module = importlib.import_module(current_name(spec.name) or spec.name)
        self._specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run (the module ran under its current name); the import system has
        replaced its ``__spec__`` by the former path's, which is put back."""
        module.__spec__ = self._specs.pop(module.__name__, module.__spec__)
