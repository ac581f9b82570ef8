"""steerkit: inference-time steering and guidance for diffusers pipelines.

>>> import steerkit
>>> pipe = steerkit.steer(stock_pipeline)              # doctest: +SKIP
>>> out = pipe("a cat", num_particles=4, hooks=[...])  # doctest: +SKIP
>>> out.steering.nfe                                   # doctest: +SKIP
"""

from . import smc  # noqa: E402,F401  (steerkit.smc.FKSteering in user code without another import)
from .diagnostics import RunTrace, StepInfo
from .guidance import ClassifierFreeGuidance, Guidance, StepContext
from .loop import denoise
from .protocols import Conditioning, RunContext, SteeringHook
from .state import ParticleState

__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use: the scheduler needs diffusers, which `import steerkit` does not load.
    if name == "FlowMatchSDEScheduler":
        from .flow_sde import FlowMatchSDEScheduler

        return FlowMatchSDEScheduler
    raise AttributeError(f"module 'steerkit' has no attribute {name!r}")


def steer(pipe):
    """The steered version of a stock diffusers pipeline instance (modules shared, not copied)."""
    from steerkit.pipelines import steer as _steer

    return _steer(pipe)


__all__ = [
    "ClassifierFreeGuidance",
    "Conditioning",
    "FlowMatchSDEScheduler",
    "Guidance",
    "ParticleState",
    "RunContext",
    "RunTrace",
    "StepContext",
    "StepInfo",
    "SteeringHook",
    "denoise",
    "steer",
]
