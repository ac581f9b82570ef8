"""Rewards (installed as ``steerkit.rewards``): one registry and one calling convention for every method."""

from .base import CallableReward, LatentReward, ModelReward, Reward, WeightedSum
from .classifier import ClassifierReward
from .clip import ClipScore
from .hub import MissingWeightsError
from .registry import (
           available_rewards,
           get_reward,
           is_differentiable,
           register_reward,
           require_differentiable,
)

__all__ = ["CallableReward", "ClassifierReward", "ClipScore", "LatentReward", "MissingWeightsError", "ModelReward",
           "Reward", "WeightedSum", "available_rewards", "get_reward", "is_differentiable", "register_reward",
           "require_differentiable"]
