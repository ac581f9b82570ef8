"""Sequential Monte Carlo steering: Feynman–Kac steering, best-of-N, twisted SMC, weights, resamplers, potentials.

Read ``fk.py`` first (the algorithm as pseudo-code), then ``potentials.py``, ``resampling.py`` and
``weights.py``: small pure pieces the hook puts together. ``proposals.py`` (the reward-gradient
proposal) and ``twisted.py`` (twisted SMC, reward-gradient guidance) build on FK.
"""

from . import potentials
from .fk import BestOfN, FKSteering
from .potentials import POTENTIALS
from .proposals import GradientProposal
from .resampling import RESAMPLERS, get_resampler, multinomial, residual, stratified, systematic
from .sharded import ShardedFKSteering
from .twisted import RewardGuidance, TwistedSMC
from .weights import effective_sample_size, log_mean_weight, normalize, sanitize_log_increment

__all__ = [
    "POTENTIALS", "RESAMPLERS", "BestOfN", "FKSteering", "GradientProposal", "RewardGuidance", "TwistedSMC",
    "effective_sample_size", "get_resampler", "log_mean_weight", "multinomial", "normalize", "potentials", "residual",
    "sanitize_log_increment", "ShardedFKSteering", "stratified", "systematic",
]
