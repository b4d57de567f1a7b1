"""Every use of a torch-internal API, in one place, each with a fallback.

PyTorch has no public way to ask whether a tensor is wrapped by a ``torch.func`` transform,
to take apart a tensor batched by ``torch.autograd``'s own vmap, or to flatten pytrees.
The rest of the library goes through the functions here; none imports ``torch._C`` or
``torch.utils._pytree`` itself. When a probe is missing (another PyTorch version), its
fallback takes the differentiable path, which is correct everywhere and only slower:

* :func:`is_wrapped` (``_functorch.is_functorch_wrapped_tensor``): without it every
  tensor counts as wrapped, so the rules take the differentiable path and skip host reads;
* :func:`is_legacy_batched` (``_functorch.is_legacy_batchedtensor``): without it no
  tensor counts as legacy-batched and the rules run on the batched tensors;
* :func:`remove_legacy_batch_dim`, :func:`add_legacy_batch_dim`, :func:`legacy_vmap_level`
  (``torch._remove_batch_dim``, ``torch._add_batch_dim``, the vmap-mode nesting level):
  reached only for legacy-batched tensors;
* ``pytree`` (``torch.utils._pytree``): no fallback, ``torch.func`` itself needs it;
* :func:`version` (``Tensor._version``, the counter in-place operations increment):
  without it every tensor counts as new, so its checks are redone on every call;
* :func:`apply_function` (``torch._C._are_functorch_transforms_active``,
  ``torch._functorch.utils.unwrap_dead_wrappers`` and the C++ ``apply`` under
  ``torch.autograd.Function.apply``): outside ``torch.func`` transforms it skips the
  signature binding ``Function.apply`` does on every call (for defaults the library's
  Functions do not have); without the probes it calls ``Function.apply``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.utils import _pytree as pytree  # the pytrees torch.func itself flattens with

__all__ = [
    "add_legacy_batch_dim",
    "is_legacy_batched",
    "is_wrapped",
    "legacy_vmap_level",
    "pytree",
    "remove_legacy_batch_dim",
]


def _probe(name: str) -> Optional[Callable[[torch.Tensor], bool]]:
    try:
        from torch._C import _functorch
    except ImportError:  # pragma: no cover - every supported torch has it
        return None
    return getattr(_functorch, name, None)


_IS_WRAPPED = _probe("is_functorch_wrapped_tensor")
_IS_LEGACY = _probe("is_legacy_batchedtensor")
_LEGACY_SUPPORTED = _IS_LEGACY is not None and all(
    hasattr(torch, n) for n in ("_remove_batch_dim", "_add_batch_dim")
) and hasattr(torch._C, "_vmapmode_increment_nesting")


def is_wrapped(t: Any) -> bool:
    """Whether ``t`` is a tensor wrapped by a ``torch.func`` transform (vmap, grad, jvp).

    Such a tensor's values cannot be read on the host and its derivative rules must be
    differentiable again. Without the probe every tensor counts as wrapped.
    """
    if not isinstance(t, torch.Tensor):
        return False
    return True if _IS_WRAPPED is None else bool(_IS_WRAPPED(t))


def is_legacy_batched(t: Any) -> bool:
    """Whether ``t`` is batched by ``torch.autograd``'s vmap (``is_grads_batched``,
    ``jacobian(vectorize=True)``, ``gradcheck(check_batched_grad=True)``)."""
    return _LEGACY_SUPPORTED and isinstance(t, torch.Tensor) and bool(_IS_LEGACY(t))  # type: ignore[misc]


def legacy_vmap_level() -> int:
    """The nesting level of ``torch.autograd``'s vmap that batched the current tensors."""
    level = torch._C._vmapmode_increment_nesting()
    torch._C._vmapmode_decrement_nesting()
    return level - 1


def remove_legacy_batch_dim(t: torch.Tensor, level: int) -> torch.Tensor:
    """The plain tensor behind a legacy-batched one, batch dimension first."""
    return torch._remove_batch_dim(t, level, 1, 0)


def add_legacy_batch_dim(t: torch.Tensor, level: int) -> torch.Tensor:
    """Batch ``t`` along dimension 0 at the given legacy vmap level."""
    return torch._add_batch_dim(t, 0, level)


def host_readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read on the host (``bool()``, ``float()``): not a
    batched or otherwise wrapped tensor, not a meta tensor."""
    return not (is_wrapped(t) or is_legacy_batched(t) or t.is_meta)


def version(t: torch.Tensor) -> Optional[int]:
    """The in-place modification counter of ``t``, ``None`` when it cannot be read: a
    tensor whose ``(id, version)`` is unchanged still holds the values it held."""
    v = getattr(t, "_version", None)
    return v if isinstance(v, int) else None


def _apply_probes() -> Optional[tuple]:
    try:
        from torch._functorch.utils import unwrap_dead_wrappers

        active = torch._C._are_functorch_transforms_active
    except (ImportError, AttributeError):
        return None
    return active, unwrap_dead_wrappers


_APPLY = _apply_probes()


def apply_function(cls: Any, *args: Any) -> Any:
    """``cls.apply(*args)`` for an ``autograd.Function`` whose ``forward`` has no defaults."""
    if _APPLY is None or _APPLY[0]():
        return cls.apply(*args)
    return super(torch.autograd.Function, cls).apply(*_APPLY[1](args))
