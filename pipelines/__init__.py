"""Drop-in steered pipelines, one module per diffusers family (installed as ``steerkit.pipelines``)."""

from .base import Adapter, SteeredMixin, steer
from .class_conditional import (
    ClassConditionalUNetAdapter,
    ClassConditionalUNetPipeline,
    SteeredClassConditionalUNetPipeline,
)
from .dit import DiTAdapter, SteeredDiTPipeline
from .flux import FluxAdapter, SteeredFluxPipeline
from .stable_diffusion import StableDiffusionAdapter, SteeredStableDiffusionPipeline
from .stable_diffusion_3 import StableDiffusion3Adapter, SteeredStableDiffusion3Pipeline
from .stable_diffusion_xl import StableDiffusionXLAdapter, SteeredStableDiffusionXLPipeline

__all__ = [
    "Adapter",
    "ClassConditionalUNetAdapter",
    "ClassConditionalUNetPipeline",
    "DiTAdapter",
    "FluxAdapter",
    "StableDiffusion3Adapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "SteeredClassConditionalUNetPipeline",
    "SteeredDiTPipeline",
    "SteeredFluxPipeline",
    "SteeredMixin",
    "SteeredStableDiffusion3Pipeline",
    "SteeredStableDiffusionPipeline",
    "SteeredStableDiffusionXLPipeline",
    "steer",
]
