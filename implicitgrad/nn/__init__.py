"""Layers whose forward pass solves an inner problem, differentiated implicitly.

:class:`ImplicitLayer` is the base class; :class:`RidgeHead` (closed-form ridge
regression) and :class:`LogisticHead` (iteratively solved logistic regression) are
few-shot heads fitted to a support set inside the forward pass; :class:`EncodeEpisode`
applies a feature extractor to an episode so that extractor and head compose in
``nn.Sequential``.
"""

from .episode import EncodeEpisode
from .heads import LogisticHead, RidgeHead
from .layer import ImplicitLayer

__all__ = ["EncodeEpisode", "ImplicitLayer", "LogisticHead", "RidgeHead"]
