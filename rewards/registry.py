"""One registry of rewards, by name, loaded lazily.

Specs :func:`get_reward` understands:

- a registered name: ``"brightness"``; names are case-insensitive;
- ``"name:argument"``: the factory gets the text after the first ``:``, e.g.
  ``"classifier:fashion"``, ``"classifier:/path/to/saved/classifier"``, ``"clip:ViT-L-14/openai"``,
  ``"hpsv2:v2.0"``, ``"pickscore:/path/to/dir"``;
- a weighted sum: ``"0.7*classifier:fashion+0.3*brightness"``, ``"brightness - 0.5*contrast"``,
  ``"-contrast"``, ``"1e-2*clip+classifier"``. A weight is an unsigned number followed by ``*``;
  terms are joined by ``+`` or ``-``. Inside a sum, an argument cannot contain whitespace,
  ``+`` or ``*``; a lone ``name:argument`` spec can contain anything (and an existing path wins
  over reading ``+`` as a sum). Hyphens inside a name (``my-reward``) belong to the name, so
  subtract with a space or a weight: ``a - b``, ``a-1*b``;
- a :class:`~steerkit.rewards.Reward` instance (returned as is), a ``Reward`` subclass
  (instantiated without arguments), or any callable ``(images, prompts) -> [B]`` (wrapped).

Factories are called only when a spec names them, so heavy imports (open_clip, model weights)
happen then, never at import time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from .base import CallableReward, Reward, WeightedSum

__all__ = ["available_rewards", "get_reward", "register_reward"]

_FACTORIES: dict[str, Callable[[str], Reward]] = {}

_NAME = r"[a-z][a-z0-9_]*(?:-[a-z][a-z0-9_]*)*"
_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?"
_TERM = re.compile(
    rf"\s*(?P<sign>[+-])?\s*(?:(?P<weight>{_NUMBER})\s*\*\s*)?(?P<name>{_NAME})(?::(?P<arg>[^\s+*]*))?\s*",
    re.IGNORECASE,
)


def register_reward(name: str, factory: Callable[[str], Reward]) -> None:
    """Register ``factory(argument) -> Reward`` under ``name``.

    ``argument`` is the text after ``name:`` in a spec (``""`` when there is none). ``name`` is a
    lower-case identifier (letters, digits, ``_``, single inner hyphens). Re-registering a name
    replaces its factory.
    """
    if not isinstance(name, str) or not re.fullmatch(_NAME, name):
        raise ValueError(f"reward names are lower-case identifiers such as 'my_reward' or 'my-reward', got {name!r}")
    if not callable(factory):
        raise TypeError(f"a reward factory must be callable, got {type(factory).__name__}")
    _FACTORIES[name] = factory


def available_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_FACTORIES)


def _unknown(name: str) -> ValueError:
    hint = " (to subtract rewards, write 'a - b' with spaces)" if "-" in name else ""
    return ValueError(f"unknown reward {name!r}; available: {', '.join(available_rewards())}{hint}")


def _parse_sum(spec: str) -> tuple[list[tuple[float, str, str]], bool] | None:
    """``(terms, is_sum)`` if ``spec`` is a well-formed sequence of terms, else ``None``.

    ``terms`` are ``(weight, name, argument)``; ``is_sum`` is false for a lone unweighted,
    unsigned term (a plain ``name`` or ``name:argument``).
    """
    terms: list[tuple[float, str, str]] = []
    explicit, position = False, 0
    while position < len(spec):
        match = _TERM.match(spec, position)
        # After the first term, every term must start with its '+' or '-'.
        if match is None or match.end() == position or (terms and match.group("sign") is None):
            return None
        sign, weight = match.group("sign"), match.group("weight")
        value = (float(weight) if weight else 1.0) * (-1.0 if sign == "-" else 1.0)
        terms.append((value, match.group("name").lower(), match.group("arg") or ""))
        explicit = explicit or sign is not None or weight is not None
        position = match.end()
    return (terms, len(terms) > 1 or explicit) if terms else None


def _build(name: str, argument: str) -> Reward:
    if name not in _FACTORIES:
        raise _unknown(name)
    reward = _FACTORIES[name](argument)
    if not isinstance(reward, Reward):
        raise TypeError(f"the factory of reward {name!r} returned {type(reward).__name__}, not a Reward")
    return reward


def get_reward(spec: Any) -> Reward:
    """A :class:`Reward` from a spec (see the module docstring).

    Raises:
        ValueError: for an unknown name (listing the available ones) or a malformed spec.
        TypeError: for a spec that is neither a string, a Reward, nor a callable.
    """
    if isinstance(spec, Reward):
        return spec
    if isinstance(spec, type) and issubclass(spec, Reward):
        return spec()
    if callable(spec):
        return CallableReward(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(f"a reward is a name, a Reward or a callable, got {spec!r}")
    spec = spec.strip()
    name, _, argument = spec.partition(":")
    name = name.strip().lower()
    # A lone "name:argument" whose argument is an existing path is never read as a sum.
    if name in _FACTORIES and argument and os.path.exists(argument):
        return _build(name, argument)
    parsed = _parse_sum(spec)
    if parsed is not None:
        terms, is_sum = parsed
        if not is_sum:
            return _build(terms[0][1], terms[0][2])
        return WeightedSum([(weight, _build(term, arg)) for weight, term, arg in terms])
    if re.fullmatch(_NAME, name):  # a lone name:argument whose argument holds spaces, '+' or '*'
        return _build(name, argument)
    raise ValueError(f"cannot parse reward spec {spec!r}: expected 'name', 'name:argument' or a sum like "
                     f"'0.7*a+0.3*b'; available rewards: {', '.join(available_rewards())}")


def _no_argument(cls):
    def factory(argument: str) -> Reward:
        if argument:
            raise ValueError(f"reward {cls.name!r} takes no argument, got {argument!r}")
        return cls()

    return factory


def _register_builtins() -> None:
    from . import simple

    for cls in (simple.Brightness, simple.Contrast, simple.Saturation):
        register_reward(cls.name, _no_argument(cls))

    def compressibility(argument: str) -> Reward:
        if argument and not argument.isdigit():
            raise ValueError(f"reward 'compressibility' takes a JPEG quality (an integer in [1, 95]), got {argument!r}")
        return simple.Compressibility(int(argument) if argument else 95)

    register_reward("compressibility", compressibility)

    def classifier(argument: str) -> Reward:
        from .classifier import load_classifier_reward

        return load_classifier_reward(argument or "fashion")

    register_reward("classifier", classifier)

    def clip(argument: str) -> Reward:
        from .clip import load_clip_score

        return load_clip_score(argument)

    register_reward("clip", clip)

    def aesthetic(argument: str) -> Reward:
        from .aesthetic import load_aesthetic

        return load_aesthetic(argument)

    def pickscore(argument: str) -> Reward:
        from .pickscore import load_pickscore

        return load_pickscore(argument)

    def hpsv2(argument: str) -> Reward:
        from .hpsv2 import load_hpsv2

        return load_hpsv2(argument)

    def imagereward(argument: str) -> Reward:
        from .imagereward import load_imagereward

        return load_imagereward(argument)

    register_reward("aesthetic", aesthetic)
    register_reward("pickscore", pickscore)
    register_reward("hpsv2", hpsv2)
    register_reward("imagereward", imagereward)


_register_builtins()
