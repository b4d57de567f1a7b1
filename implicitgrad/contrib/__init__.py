"""General-purpose infrastructure beside the core, imported only on use.

``import implicitgrad`` loads none of it. Each submodule is imported the first time it is
used, as ``implicitgrad.contrib.training`` or ``import implicitgrad.contrib.data``:

* :mod:`implicitgrad.contrib.training`: atomic checkpoints and a training loop that
  resumes bit for bit (``run_training``, ``save_checkpoint``, ``load_checkpoint``, ...);
* :mod:`implicitgrad.contrib.data`: task samplers and offline few-shot datasets
  (``Sinusoid``, ``EpisodeSampler``, ``load_omniglot``, ``load_digits_fewshot``, ...).

The former paths ``implicitgrad.training`` and ``implicitgrad.data`` name the same
modules.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["data", "training"]


def __getattr__(name: str) -> ModuleType:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
