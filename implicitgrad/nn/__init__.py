"""Layers whose forward pass solves an inner problem, differentiated implicitly.

:class:`ImplicitLayer` is the base class; :class:`RidgeHead` (closed-form ridge
regression) and :class:`LogisticHead` (iteratively solved logistic regression) are
few-shot heads fitted to a support set inside the forward pass; :class:`EncodeEpisode`
applies a feature extractor to an episode so that extractor and head compose in
``nn.Sequential``. :class:`DEQ` is a deep equilibrium layer (the fixed point of a cell
``z = f(z, x)`` per sample) and :class:`QP` a batched quadratic-program layer on
:func:`implicitgrad.qp_solve`.
"""

from .deq import DEQ, DEQInfo
from .episode import EncodeEpisode
from .heads import LogisticHead, RidgeHead
from .layer import ImplicitLayer
from .qp import QP

__all__ = ["DEQ", "DEQInfo", "EncodeEpisode", "ImplicitLayer", "LogisticHead", "QP", "RidgeHead"]
