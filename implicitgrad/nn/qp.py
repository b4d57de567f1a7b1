"""``QP``: a batched quadratic-program layer (OptNet) on :func:`implicitgrad.qp_solve`."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, cast

import torch
from torch import nn

from .._diagnostics import check_on_failure
from .._validation import check_count, check_positive_number
from ..qp import QPInfo, qp_solve

__all__ = ["QP"]

_TERMS = ("Q", "p", "G", "h", "A", "b")


class QP(nn.Module):
    r"""A layer that returns the solution of a convex quadratic program.

    .. math::

        z^\star = \arg\min_z \; \tfrac12 z^\top Q z + p^\top z
        \quad\text{s.t.}\quad G z \le h, \quad A z = b ,

    solved and differentiated by :func:`~implicitgrad.qp_solve` (a batched interior-point
    forward, the KKT backward of Amos and Kolter, 2017). Each of the six terms is either
    a parameter of the layer (named in ``learn``) or given to :meth:`forward`; a term given
    to :meth:`forward` takes the place of the learned one. A learned ``Q`` is
    parametrised as :math:`L L^\top + \epsilon I` (positive definite by construction,
    ``L`` starts at the identity); a learned ``G`` starts random (scaled by
    :math:`1/\sqrt n`), ``h`` at ones (so ``z = 0`` is feasible), ``A`` random and ``b`` at
    zero, ``p`` at zero. Terms neither learned nor given default to ``Q = I``, ``p = 0``;
    ``G, h`` (``A, b``) must be learned or given when ``n_ineq`` (``n_eq``) is positive.

    Args:
        n: number of variables.
        n_ineq: number of inequality rows of ``G``.
        n_eq: number of equality rows of ``A``.
        learn: the terms held as parameters, a subset of ``("Q", "p", "G", "h", "A", "b")``.
        eps: the :math:`\epsilon` of a learned ``Q``.
        tol, maxiter, on_failure: as in :func:`~implicitgrad.qp_solve`.
        dtype: dtype of the parameters (``None``: torch's default).

    Attributes:
        last_info: the :class:`~implicitgrad.QPInfo` of the latest call.

    Raises:
        ValueError: an unknown term in ``learn``, a missing term in :meth:`forward`.

    Example:
        >>> import torch, implicitgrad as ig
        >>> layer = ig.nn.QP(3, n_ineq=4, learn=("G", "h"), dtype=torch.float64)
        >>> x = torch.randn(8, 3, dtype=torch.float64)
        >>> z = layer(p=-x)                       # the projection of x onto {z : G z ≤ h}
        >>> z.shape, layer.last_info.converged
        (torch.Size([8, 3]), True)
        >>> bool((z @ layer.G.T <= layer.h + 1e-8).all())
        True
    """

    def __init__(
        self,
        n: int,
        n_ineq: int = 0,
        n_eq: int = 0,
        *,
        learn: Sequence[str] = (),
        eps: float = 1e-4,
        tol: Optional[float] = None,
        maxiter: int = 50,
        on_failure: str = "warn",
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.n = check_count("n", n, "QP")
        self.n_ineq = check_count("n_ineq", n_ineq, "QP", minimum=0)
        self.n_eq = check_count("n_eq", n_eq, "QP", minimum=0)
        unknown = sorted(set(learn) - set(_TERMS))
        if unknown:
            raise ValueError(f"QP: learn names unknown terms {unknown}; choose from {_TERMS}.")
        for term, rows in (("G", n_ineq), ("h", n_ineq), ("A", n_eq), ("b", n_eq)):
            if term in learn and rows == 0:
                raise ValueError(f"QP: learn includes {term!r} but its number of rows is 0; pass "
                                 f"{'n_ineq' if term in 'Gh' else 'n_eq'}.")
        self.learn = tuple(t for t in _TERMS if t in learn)
        self.eps = check_positive_number("eps", eps, "QP")
        check_on_failure(on_failure)
        self.tol, self.maxiter, self.on_failure = tol, maxiter, on_failure
        dt = dtype or torch.get_default_dtype()
        if "Q" in self.learn:
            self.L = nn.Parameter(torch.eye(n, dtype=dt))
        if "p" in self.learn:
            self.p = nn.Parameter(torch.zeros(n, dtype=dt))
        if "G" in self.learn:
            self.G = nn.Parameter(torch.randn(n_ineq, n, dtype=dt) / n**0.5)
        if "h" in self.learn:
            self.h = nn.Parameter(torch.ones(n_ineq, dtype=dt))
        if "A" in self.learn:
            self.A = nn.Parameter(torch.randn(n_eq, n, dtype=dt) / n**0.5)
        if "b" in self.learn:
            self.b = nn.Parameter(torch.zeros(n_eq, dtype=dt))
        self.last_info: Optional[QPInfo] = None

    def extra_repr(self) -> str:
        return f"n={self.n}, n_ineq={self.n_ineq}, n_eq={self.n_eq}, learn={self.learn}"

    def terms(self, **given: Optional[torch.Tensor]) -> Dict[str, Optional[torch.Tensor]]:
        """The six terms of the problem: given ones, else learned ones, else defaults."""
        out: Dict[str, Optional[torch.Tensor]] = {}
        for term in _TERMS:
            value = given.get(term)
            if value is None and term in self.learn:
                if term == "Q":
                    eye = torch.eye(self.n, dtype=self.L.dtype, device=self.L.device)
                    value = self.L @ self.L.T + self.eps * eye
                else:
                    value = getattr(self, term)
            out[term] = value
        ref = next((t for t in out.values() if t is not None), None)
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        device = ref.device if ref is not None else None
        if out["Q"] is None:
            out["Q"] = torch.eye(self.n, dtype=dtype, device=device)
        if out["p"] is None:
            out["p"] = torch.zeros(self.n, dtype=dtype, device=device)
        for pair, rows, count in ((("G", "h"), self.n_ineq, "n_ineq"), (("A", "b"), self.n_eq, "n_eq")):
            missing = [t for t in pair if out[t] is None]
            if rows and missing:
                raise ValueError(f"QP: {count}={rows} but {missing} is neither learned nor given; pass it to "
                                 "forward (e.g. layer(p=..., h=...)) or add it to learn.")
        return out

    def forward(
        self,
        p: Optional[torch.Tensor] = None,
        *,
        Q: Optional[torch.Tensor] = None,
        G: Optional[torch.Tensor] = None,
        h: Optional[torch.Tensor] = None,
        A: Optional[torch.Tensor] = None,
        b: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Solve the batch of problems; terms given here override learned ones (shapes as in
        :func:`~implicitgrad.qp_solve`, with or without a leading batch dimension)."""
        t = self.terms(Q=Q, p=p, G=G, h=h, A=A, b=b)
        Q_, p_ = cast(torch.Tensor, t["Q"]), cast(torch.Tensor, t["p"])  # terms() fills both in
        z, self.last_info = qp_solve(Q_, p_, t["G"], t["h"], t["A"], t["b"], tol=self.tol,
                                     maxiter=self.maxiter, on_failure=self.on_failure, return_info=True)
        return z
