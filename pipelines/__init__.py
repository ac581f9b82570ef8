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
from .pixart import PixArtSigmaAdapter, SteeredPixArtSigmaPipeline
from .qwenimage import QwenImageAdapter, QwenImageGuidance, SteeredQwenImagePipeline
from .sana import SanaAdapter, SteeredSanaPipeline
from .stable_diffusion import StableDiffusionAdapter, SteeredStableDiffusionPipeline
from .stable_diffusion_3 import StableDiffusion3Adapter, SteeredStableDiffusion3Pipeline
from .stable_diffusion_xl import StableDiffusionXLAdapter, SteeredStableDiffusionXLPipeline
from .z_image import (
    SteeredZImagePipeline,
    ZImageAdapter,
    ZImageClassifierFreeGuidance,
    ZImageGuidance,
)

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
    "PixArtSigmaAdapter",
    "SanaAdapter",
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
    "SteeredPixArtSigmaPipeline",
    "SteeredSanaPipeline",
    "SteeredStableDiffusion3Pipeline",
    "SteeredStableDiffusionPipeline",
    "SteeredStableDiffusionXLPipeline",
    "SteeredZImagePipeline",
    "ZImageAdapter",
    "ZImageClassifierFreeGuidance",
    "ZImageGuidance",
    "steer",
]
