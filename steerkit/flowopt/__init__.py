"""FlowOpt: zeroth-order optimisation through the whole flow sampling path (inversion, editing)."""

from .flowmap import FlowMap
from .optimize import AndersonMixer, FlowOptResult, edit, flowopt, invert, psnr
from .step_size import estimate_step_size_bound, pair_ratio

__all__ = ["AndersonMixer", "FlowMap", "FlowOptResult", "edit", "estimate_step_size_bound", "flowopt", "invert", "pair_ratio", "psnr"]
