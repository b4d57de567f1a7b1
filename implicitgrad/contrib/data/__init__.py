"""Task samplers and offline datasets for meta-learning examples and benchmarks.

This package is standalone: it imports nothing else from implicitgrad.
"""

from .digits import load_digits_fewshot
from .episodes import EpisodeSampler, class_split
from .fewshot import FewShotDataset
from .omniglot import load_omniglot
from .sinusoid import Sinusoid, SinusoidFunction

__all__ = [
    "EpisodeSampler",
    "FewShotDataset",
    "Sinusoid",
    "SinusoidFunction",
    "class_split",
    "load_digits_fewshot",
    "load_omniglot",
]
