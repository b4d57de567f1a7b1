"""One registry of linear solvers and one tolerance table per dtype, shared by the suites."""

from __future__ import annotations

import torch

import implicitgrad as ig
from implicitgrad.testing import relative_error

#: The dtypes every linear solver is run in, and the transforms of a hypergradient each is
#: run under (tests/test_matrix.py crosses the three).
DTYPES = (torch.float64, torch.float32)
TRANSFORMS = ("backward", "double_backward", "jvp", "vmap")

#: Relative tolerance of a converged hypergradient, per dtype.
RTOL = {torch.float64: 1e-8, torch.float32: 1e-3}
#: Relative tolerance of the dense reference, per dtype.
EXACT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def linear_solvers(lipschitz: float = 1.0, symmetric: bool = True):
    """(name, solver) pairs that converge on a system whose largest eigenvalue is ``lipschitz``.

    Neumann gets the step ``1/λ_max``; ``symmetric=False`` drops the solvers that assume a
    symmetric matrix (CG, MINRES) and Neumann.
    """
    solvers = [
        ("Exact", ig.Exact()),
        ("GMRES", ig.GMRES(maxiter=500, restart=50)),
        ("BiCGStab", ig.BiCGStab(maxiter=1000)),
    ]
    if symmetric:
        solvers += [
            ("CG", ig.CG(maxiter=500)),
            ("MINRES", ig.MINRES(maxiter=500)),
            ("Neumann", ig.Neumann(maxiter=50000, alpha=1.0 / lipschitz)),
        ]
    return solvers


def spd_matrix(n: int, cond: float, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """``Q diag(λ) Qᵀ`` with eigenvalues log-spaced in ``[1, cond]``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return (q @ torch.diag(lam) @ q.T).to(dtype)


def symmetric_matrix(eigenvalues, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigenvalues) Qᵀ`` with a random orthogonal ``Q``: any signs, so indefinite or
    singular matrices with a chosen spectrum."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=torch.float64))
    return (q @ torch.diag(lam) @ q.T).to(dtype)


#: ``‖a − b‖ / ‖b‖`` in float64, on detached values: the one relative error of the suites.
rel_err = relative_error
