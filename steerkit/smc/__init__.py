"""Sequential Monte Carlo steering: Feynman–Kac steering, best-of-N, weights, resamplers, potentials."""

from .fk import BestOfN, FKSteering
from .potentials import POTENTIALS
from .resampling import RESAMPLERS, get_resampler
from .weights import effective_sample_size, normalize

__all__ = ["POTENTIALS", "RESAMPLERS", "BestOfN", "FKSteering", "effective_sample_size", "get_resampler", "normalize"]
