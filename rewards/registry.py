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

Options. ``get_reward(spec, dtype=torch.float16, device="cuda")`` loads model rewards in that
dtype, on that device (the default: float32, following the images' device). In a weighted sum the
options go to every term that loads a model; a reward without a model (``brightness``) rejects
them when named alone.

Gradients. Each registered name declares whether its score is differentiable in the images
(:func:`is_differentiable`); :func:`require_differentiable` is the check for methods that need
gradients.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable
from typing import Any

from .base import CallableReward, Reward, WeightedSum, check_model_dtype

__all__ = ["available_rewards", "get_reward", "is_differentiable", "register_reward", "require_differentiable"]

_FACTORIES: dict[str, Callable[..., Reward]] = {}
_DIFFERENTIABLE: dict[str, bool] = {}
_TAKES_OPTIONS: dict[str, bool] = {}

_NAME = r"[a-z][a-z0-9_]*(?:-[a-z][a-z0-9_]*)*"
_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?"
_TERM = re.compile(
    rf"\s*(?P<sign>[+-])?\s*(?:(?P<weight>{_NUMBER})\s*\*\s*)?(?P<name>{_NAME})(?::(?P<arg>[^\s+*]*))?\s*",
    re.IGNORECASE,
)


def register_reward(name: str, factory: Callable[..., Reward], *, differentiable: bool = False) -> None:
    """Register ``factory(argument) -> Reward`` under ``name``.

    ``argument`` is the text after ``name:`` in a spec (``""`` when there is none). A factory that
    also takes ``device`` and ``dtype`` keywords gets :func:`get_reward`'s options. ``name`` is a
    lower-case identifier (letters, digits, ``_``, single inner hyphens). ``differentiable``
    declares that the reward's score has gradients with respect to the images (the instance's
    ``differentiable`` attribute says the same). Re-registering a name replaces its factory.
    """
    if not isinstance(name, str) or not re.fullmatch(_NAME, name):
        raise ValueError(f"reward names are lower-case identifiers such as 'my_reward' or 'my-reward', got {name!r}")
    if not callable(factory):
        raise TypeError(f"a reward factory must be callable, got {type(factory).__name__}")
    if not isinstance(differentiable, bool):
        raise ValueError(f"differentiable must be True or False, got {differentiable!r}")
    _FACTORIES[name] = factory
    _DIFFERENTIABLE[name] = differentiable
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature
        parameters = {}
    _TAKES_OPTIONS[name] = ({"device", "dtype"} <= set(parameters)
                            or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()))


def available_rewards(differentiable: bool | None = None) -> list[str]:
    """The registered reward names, sorted; ``differentiable=True`` (``False``) keeps those that are (are not)."""
    return sorted(n for n in _FACTORIES if differentiable is None or _DIFFERENTIABLE[n] == differentiable)


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


def _build(name: str, argument: str, options: dict[str, Any], alone: bool = True) -> Reward:
    if name not in _FACTORIES:
        raise _unknown(name)
    if options and not _TAKES_OPTIONS[name]:
        if alone:
            raise ValueError(f"reward {name!r} loads no model, so {' and '.join(f'{k}=' for k in options)} do not "
                             "apply to it")
        options = {}  # a statistic inside a sum: the options are for the terms with models
    reward = _FACTORIES[name](argument, **options)
    if not isinstance(reward, Reward):
        raise TypeError(f"the factory of reward {name!r} returned {type(reward).__name__}, not a Reward")
    return reward


def get_reward(spec: Any, *, device: Any = None, dtype: Any = None) -> Reward:
    """A :class:`Reward` from a spec (see the module docstring).

    ``device`` and ``dtype`` (float32, float16 or bfloat16) place and cast the models of registry
    rewards; they do not apply to a :class:`Reward` instance or a callable.

    Raises:
        ValueError: for an unknown name (listing the available ones), a malformed spec, a bad dtype,
            or options given to rewards that load no model.
        TypeError: for a spec that is neither a string, a Reward, nor a callable.
    """
    options = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    if dtype is not None:
        check_model_dtype(dtype, str(spec))
    if not isinstance(spec, str) and options:
        raise ValueError(f"device= and dtype= apply to registry specs, not to {type(spec).__name__}; move or cast "
                         "the model yourself")
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
        return _build(name, argument, options)
    parsed = _parse_sum(spec)
    if parsed is not None:
        terms, is_sum = parsed
        if not is_sum:
            return _build(terms[0][1], terms[0][2], options)
        if options and not any(_TAKES_OPTIONS.get(term, False) for _, term, _ in terms):
            raise ValueError(f"no reward in {spec!r} loads a model, so device= and dtype= do not apply")
        return WeightedSum([(weight, _build(term, arg, options, alone=False)) for weight, term, arg in terms])
    if re.fullmatch(_NAME, name):  # a lone name:argument whose argument holds spaces, '+' or '*'
        return _build(name, argument, options)
    raise ValueError(f"cannot parse reward spec {spec!r}: expected 'name', 'name:argument' or a sum like "
                     f"'0.7*a+0.3*b'; available rewards: {', '.join(available_rewards())}")


def is_differentiable(spec: Any) -> bool:
    """Whether a reward's score has gradients with respect to its input, without loading it.

    ``spec``: a registered name (``"hpsv2"``, ``"clip:ViT-L-14/openai"``), a weighted sum (all of
    its terms must be), or a :class:`Reward` (its ``differentiable`` attribute).

    Raises:
        ValueError: for an unknown name or a malformed spec.
    """
    if isinstance(spec, Reward):
        return bool(getattr(spec, "differentiable", False))
    if not isinstance(spec, str):
        raise TypeError(f"is_differentiable takes a reward spec or a Reward, got {type(spec).__name__}")
    name = spec.strip().partition(":")[0].strip().lower()
    if name in _FACTORIES and os.path.exists(spec.strip().partition(":")[2]):
        return _DIFFERENTIABLE[name]
    parsed = _parse_sum(spec.strip())
    if parsed is None:
        raise ValueError(f"cannot parse reward spec {spec!r}")
    for _, term, _ in parsed[0]:
        if term not in _FACTORIES:
            raise _unknown(term)
    return all(_DIFFERENTIABLE[term] for _, term, _ in parsed[0])


def require_differentiable(spec: Any, purpose: str = "this method") -> None:
    """Raise a clear ``ValueError`` unless ``spec`` is differentiable (see :func:`is_differentiable`).

    ``purpose`` names the caller in the message (``"reward-gradient guidance"``).
    """
    if is_differentiable(spec):
        return
    name = spec.name if isinstance(spec, Reward) else spec
    raise ValueError(f"{purpose} needs the gradient of its reward, and reward {name!r} is not differentiable; "
                     f"differentiable rewards: {', '.join(available_rewards(differentiable=True))}")


def _no_argument(cls):
    def factory(argument: str) -> Reward:
        if argument:
            raise ValueError(f"reward {cls.name!r} takes no argument, got {argument!r}")
        return cls()

    return factory


def _register_builtins() -> None:
    from . import simple

    for cls in (simple.Brightness, simple.Contrast, simple.Saturation):
        register_reward(cls.name, _no_argument(cls), differentiable=True)

    def compressibility(argument: str) -> Reward:
        if argument and not argument.isdigit():
            raise ValueError(f"reward 'compressibility' takes a JPEG quality (an integer in [1, 95]), got {argument!r}")
        return simple.Compressibility(int(argument) if argument else 95)

    register_reward("compressibility", compressibility)

    def classifier(argument: str, device: Any = None, dtype: Any = None) -> Reward:
        from .classifier import load_classifier_reward

        return load_classifier_reward(argument or "fashion", device=device, dtype=dtype)

    register_reward("classifier", classifier, differentiable=True)

    def lazy(module: str, loader: str) -> Callable[..., Reward]:
        def factory(argument: str, device: Any = None, dtype: Any = None) -> Reward:
            import importlib

            return getattr(importlib.import_module(f"{__package__}.{module}"), loader)(argument, device=device,
                                                                                        dtype=dtype)

        return factory

    for name, module, loader, differentiable in (
            ("clip", "clip", "load_clip_score", True),
            ("aesthetic", "aesthetic", "load_aesthetic", True),
            ("pickscore", "pickscore", "load_pickscore", True),
            ("hpsv2", "hpsv2", "load_hpsv2", True),
            ("imagereward", "imagereward", "load_imagereward", True),
            ("hpsv3", "hpsv3", "load_hpsv3", True),
            ("vlm", "vlm", "load_vqascore", False),
            ("unifiedreward", "vlm", "load_unifiedreward", False)):
        register_reward(name, lazy(module, loader), differentiable=differentiable)

_register_builtins()
