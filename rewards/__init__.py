"""Rewards (installed as ``steerkit.rewards``): one registry and one calling convention for every method."""

from .base import CallableReward, Reward, WeightedSum
from .classifier import ClassifierReward
from .clip import ClipScore
from .hub import MissingWeightsError
from .registry import available_rewards, get_reward, register_reward

__all__ = ["CallableReward", "ClassifierReward", "ClipScore", "MissingWeightsError", "Reward", "WeightedSum",
           "available_rewards", "get_reward", "register_reward"]
