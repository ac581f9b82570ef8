"""One registry of rewards, by name, loaded lazily.

``get_reward("brightness")``, ``get_reward("classifier:fashion")`` (``name:argument``), a callable,
or a weighted sum written ``"0.7*classifier:fashion+0.3*brightness"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .base import CallableReward, Reward, WeightedSum

_FACTORIES: dict[str, Callable[[str], Reward]] = {}


def register_reward(name: str, factory: Callable[[str], Reward]) -> None:
    """Register ``factory(argument) -> Reward`` under ``name`` (``argument`` is the text after ``:``)."""
    if not re.fullmatch(r"[a-z][a-z0-9_\-]*", name):
        raise ValueError(f"reward names are lower-case identifiers, got {name!r}")
    _FACTORIES[name] = factory


def available_rewards() -> list[str]:
    return sorted(_FACTORIES)


_TERM = re.compile(r"^\s*(?:([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*\*\s*)?(.+?)\s*$")


def get_reward(spec: Any) -> Reward:
    """A :class:`Reward` from a name, ``name:argument``, a weighted sum string, a Reward, or a callable."""
    if isinstance(spec, Reward):
        return spec
    if callable(spec):
        return CallableReward(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(f"a reward is a name, a Reward or a callable, got {spec!r}")
    terms = [t for t in spec.split("+") if t.strip()]
    if len(terms) > 1 or _TERM.match(terms[0]).group(1):
        parsed = []
        for term in terms:
            match = _TERM.match(term)
            weight = float(match.group(1)) if match.group(1) else 1.0
            parsed.append((weight, get_reward(match.group(2))))
        return WeightedSum(parsed)
    name, _, argument = spec.strip().partition(":")
    if name not in _FACTORIES:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(available_rewards())}")
    reward = _FACTORIES[name](argument)
    return reward


def _simple(cls):
    def factory(argument: str) -> Reward:
        if argument:
            raise ValueError(f"reward {cls.name!r} takes no argument, got {argument!r}")
        return cls()

    return factory


def _register_builtins() -> None:
    from . import simple

    for cls in (simple.Brightness, simple.Contrast, simple.Saturation):
        register_reward(cls.name, _simple(cls))

    def classifier(argument: str) -> Reward:
        from .classifier import load_classifier_reward

        return load_classifier_reward(argument or "fashion")

    register_reward("classifier", classifier)

    def clip(argument: str) -> Reward:
        from .clip import load_clip_score

        return load_clip_score(argument)

    register_reward("clip", clip)


_register_builtins()
