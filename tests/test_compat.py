"""Torch-internal APIs are reached only through ``implicitgrad._compat``, with fallbacks."""

import ast
import pathlib

import pytest
import torch
from torch import nn

import implicitgrad as ig
from implicitgrad import _compat
from implicitgrad.meta._base import vmappable

PACKAGE = pathlib.Path(ig.__file__).parent


def _private_torch_uses(path: pathlib.Path):
    """Imports of ``torch._*`` / ``torch.utils._*`` and attribute chains ``torch._x`` or
    ``nn.modules.<m>._X`` in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(part.startswith("_") for n in names for part in n.split(".")):
                found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("torch") and any(p.startswith("_") for p in alias.name.split(".")):
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.Attribute):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in ("torch", "nn"):
                chain.append(inner.id)
                chain.reverse()
                if any(p.startswith("_") and not p.startswith("__") for p in chain[1:]):
                    found.append((node.lineno, ".".join(chain)))
    return found


def test_scanner_finds_private_uses(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "import torch\nfrom torch.utils import _pytree\nfrom torch._C import _functorch\n"
        "x = torch._C._functorch.is_batchedtensor\ny = torch.nn.modules.batchnorm._NormBase\n"
    )
    assert {line for line, _ in _private_torch_uses(src)} == {2, 3, 4, 5}


def test_no_private_torch_outside_compat():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_compat.py" and path.parent == PACKAGE:
            continue
        uses = _private_torch_uses(path)
        if uses:
            offenders[str(path.relative_to(PACKAGE))] = uses
    assert not offenders, f"private torch APIs outside _compat.py: {offenders}"


def test_compat_probes_report_plain_and_wrapped_tensors():
    t = torch.ones(3)
    assert not _compat.is_wrapped(t) and not _compat.is_legacy_batched(t)
    seen = []
    torch.func.vmap(lambda row: seen.append(_compat.is_wrapped(row)) or row)(torch.ones(2, 3))
    assert seen == [True]
    assert not _compat.is_wrapped(1.0)


def test_missing_wrapped_probe_falls_back_to_differentiable_path(monkeypatch):
    """Without the probe every tensor counts as wrapped: the rules take the torch.func path,
    whose hypergradient agrees with the closed form."""
    monkeypatch.setattr(_compat, "_IS_WRAPPED", None)
    assert _compat.is_wrapped(torch.ones(2))
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    theta = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)

    def objective(x, theta):
        return 0.5 * x @ A @ x - theta @ x

    x = ig.implicit_solve(objective, torch.zeros(2, dtype=torch.float64), theta,
                          solver=lambda f, x0, th: torch.linalg.solve(A, th), on_failure="ignore")
    (x ** 2).sum().backward()
    xs = torch.linalg.solve(A, theta.detach())
    torch.testing.assert_close(theta.grad, torch.linalg.solve(A, 2 * xs))


@pytest.mark.parametrize(
    "module, vmap_ok",
    [
        (nn.BatchNorm1d(3), False),
        (nn.InstanceNorm1d(3, track_running_stats=True), False),
        (nn.LazyBatchNorm1d(), False),
        (nn.Dropout(0.5), False),
        (nn.Dropout2d(0.5), False),
        (nn.AlphaDropout(0.5), False),
        (nn.Dropout(0.0), True),
        (nn.Linear(3, 3), True),
    ],
)
def test_vmappable_recognises_public_norm_and_dropout_classes(module, vmap_ok):
    assert vmappable(nn.Sequential(nn.Linear(3, 3), module).train()) is vmap_ok
