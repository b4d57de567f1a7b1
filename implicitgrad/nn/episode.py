"""``EncodeEpisode``: apply a feature extractor to both sets of a few-shot episode."""

from __future__ import annotations

from typing import Any, Tuple

import torch
from torch import nn


class EncodeEpisode(nn.Module):
    """Map an episode ``(x_support, y_support, x_query)`` to ``(φ(x_support), y_support, φ(x_query))``.

    Lets a feature extractor ``φ`` and a few-shot head such as :class:`RidgeHead` or
    :class:`LogisticHead` form one ``nn.Sequential``: the head fits its inner problem on
    the encoded support set and predicts the encoded query set, and the implicit gradient
    of the head flows back into ``φ``. The two sets are encoded by separate calls, so
    batch statistics (e.g. ``BatchNorm`` in training mode) never mix them.

    Args:
        encoder: the feature extractor, mapping a batch of inputs to ``(batch, d)``
            features.

    Raises:
        TypeError: ``encoder`` is not an ``nn.Module``; at call time, not an episode of
            three elements.

    Example:
        >>> import torch, implicitgrad as ig
        >>> model = torch.nn.Sequential(
        ...     ig.nn.EncodeEpisode(torch.nn.Linear(8, 16)), ig.nn.RidgeHead(lam=1.0))
        >>> x_s, y_s, x_q = torch.randn(10, 8), torch.arange(10) % 5, torch.randn(4, 8)
        >>> model((x_s, y_s, x_q)).shape
        torch.Size([4, 5])
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"EncodeEpisode: encoder must be an nn.Module, got {type(encoder).__name__}.")
        self.encoder = encoder

    def forward(self, *episode: Any) -> Tuple[torch.Tensor, Any, torch.Tensor]:
        if len(episode) == 1 and isinstance(episode[0], (tuple, list)):
            episode = tuple(episode[0])
        if len(episode) != 3:
            raise TypeError(
                "EncodeEpisode expects an episode (x_support, y_support, x_query), "
                f"got {len(episode)} element(s)."
            )
        x_support, y_support, x_query = episode
        return self.encoder(x_support), y_support, self.encoder(x_query)
