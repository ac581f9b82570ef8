"""Drop-in steered pipelines, one module per diffusers family (installed as ``steerkit.pipelines``)."""

from .base import Adapter, SteeredMixin, steer
from .class_conditional import (
    ClassConditionalUNetAdapter,
    ClassConditionalUNetPipeline,
    SteeredClassConditionalUNetPipeline,
)
from .dit import DiTAdapter, SteeredDiTPipeline
from .flux import FluxAdapter, SteeredFluxPipeline
from .flux2 import Flux2Adapter, Flux2KleinAdapter, SteeredFlux2KleinPipeline, SteeredFlux2Pipeline
from .qwenimage import QwenImageAdapter, QwenImageGuidance, SteeredQwenImagePipeline
from .stable_diffusion import StableDiffusionAdapter, SteeredStableDiffusionPipeline
from .stable_diffusion_3 import StableDiffusion3Adapter, SteeredStableDiffusion3Pipeline
from .stable_diffusion_xl import StableDiffusionXLAdapter, SteeredStableDiffusionXLPipeline

__all__ = [
    "Adapter",
    "ClassConditionalUNetAdapter",
    "ClassConditionalUNetPipeline",
    "DiTAdapter",
    "Flux2Adapter",
    "Flux2KleinAdapter",
    "FluxAdapter",
    "QwenImageAdapter",
    "QwenImageGuidance",
    "StableDiffusion3Adapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "SteeredClassConditionalUNetPipeline",
    "SteeredDiTPipeline",
    "SteeredFlux2KleinPipeline",
    "SteeredFlux2Pipeline",
    "SteeredFluxPipeline",
    "SteeredMixin",
    "SteeredQwenImagePipeline",
    "SteeredStableDiffusion3Pipeline",
    "SteeredStableDiffusionPipeline",
    "SteeredStableDiffusionXLPipeline",
    "steer",
]
