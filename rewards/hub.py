"""Finding and reading the weights of hub-backed rewards, safely and offline-aware.

Every hub reward resolves its weights in the same order: an explicit path (the spec's argument),
then the reward's environment variable, then the Hugging Face cache, downloading only when
``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is not set. When none of them has the file, a
:class:`MissingWeightsError` names the file, the repository, the spec form and the environment
variable that would provide it.

Checkpoints are read as ``.safetensors``, or with ``torch.load(weights_only=True)``, which only
rebuilds tensors and plain containers: steerkit never unpickles arbitrary objects.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["MissingWeightsError", "find_any", "find_file", "hub_offline", "load_strict", "read_state_dict", "require_tokenizer_files"]

_TRUE = {"1", "on", "yes", "true"}


class MissingWeightsError(FileNotFoundError):
    """A reward's weights are neither given, nor cached, nor downloadable; the message says how to provide them."""


def hub_offline() -> bool:
    """Whether the Hugging Face hub may be contacted (read at call time, not import time)."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _how(reward: str, filename: str, env_var: str) -> str:
    return f"pass '{reward}:/path/to/{filename}' (or the path to the loader) or set {env_var}=/path/to/{filename}"


def find_file(reward: str, path: str | None, env_var: str, repo_id: str, filename: str) -> str:
    """The local path of a reward's weight file: ``path``, else ``$env_var``, else the hub cache.

    Raises:
        MissingWeightsError: naming ``filename`` and ``repo_id`` and how to provide the file.
    """
    for source, candidate in (("path", path), (env_var, os.environ.get(env_var))):
        if candidate:
            if not Path(candidate).is_file():
                raise MissingWeightsError(f"reward {reward!r}: weight file {candidate!r} (from {source}) does not "
                                          f"exist; expected {filename} from the Hugging Face repo {repo_id}")
            return str(candidate)
    offline = hub_offline()
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id, filename, local_files_only=offline)
    except Exception as error:  # LocalEntryNotFoundError, network errors, missing repo or file
        reason = ("it is not in the Hugging Face cache and HF_HUB_OFFLINE is set" if offline
                  else f"the download failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
        raise MissingWeightsError(
            f"reward {reward!r}: weight file {filename} from the Hugging Face repo {repo_id} is not available "
            f"({reason}). Download it (huggingface-cli download {repo_id} {filename}), then "
            f"{_how(reward, filename, env_var)}") from None


def find_any(reward: str, repo_id: str, filenames: list[str] | tuple[str, ...], how: str = "") -> str:
    """The local path of the first of ``filenames`` the Hugging Face repo ``repo_id`` has (cache first).

    Offline (``HF_HUB_OFFLINE``) only the cache is read. The order is the preference order: put
    ``.safetensors`` names first.

    Raises:
        MissingWeightsError: naming the repo, the files tried and ``how`` else to provide them.
    """
    from huggingface_hub import hf_hub_download

    offline = hub_offline()
    errors = []
    for filename in filenames:
        try:
            return hf_hub_download(repo_id, filename, local_files_only=offline)
        except Exception as error:  # not cached, not in the repo, no network: try the next name
            errors.append(f"{filename}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    reason = "not in the Hugging Face cache and HF_HUB_OFFLINE is set" if offline else "; ".join(errors)
    raise MissingWeightsError(
        f"reward {reward!r}: none of {', '.join(filenames)} from the Hugging Face repo {repo_id} is available "
        f"({reason}). Download one (huggingface-cli download {repo_id} {filenames[0]}){', ' + how if how else ''}")


def read_state_dict(path: str | os.PathLike, reward: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch checkpoint read with ``weights_only=True``.

    A checkpoint that wraps its weights (``{"state_dict": ...}``, ``{"model": ...}``) is unwrapped,
    and a ``module.`` prefix (DistributedDataParallel) is dropped.

    Raises:
        ValueError: if the file holds anything but tensors and plain containers (it is not unpickled).
    """
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"reward {reward!r}: {path} holds Python objects besides tensors, and steerkit reads torch "
                f"checkpoints only with torch.load(weights_only=True); it never unpickles them. Convert the "
                f"checkpoint to .safetensors in an environment you trust ({str(error).splitlines()[0]})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"reward {reward!r}: {path} does not hold a state dict (got {type(state).__name__})")
    tensors = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[key[len("module."):] if key.startswith("module.") else key] = value
    if not tensors:
        raise ValueError(f"reward {reward!r}: {path} holds no tensors")
    return tensors


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], reward: str, path: str) -> list[str]:
    """Load ``state`` into ``module``; every parameter must be there. Returns the keys it did not use.

    Raises:
        ValueError: naming the missing or mis-shaped parameters (a checkpoint for another model).
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} ≠ {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or wrong:
        detail = "; ".join(filter(None, [f"missing {', '.join(missing[:6])}" + (" …" if len(missing) > 6 else "")
                                         if missing else "",
                                         f"shape {', '.join(wrong[:4])}" if wrong else ""]))
        raise ValueError(f"reward {reward!r}: {path} does not fit the model: {detail}")
    module.load_state_dict({k: state[k] for k in own}, strict=True)
    return [k for k in state if k not in own]


def require_tokenizer_files(reward: str, source: str, filenames: tuple[str, ...], how: str) -> str:
    """Check that a tokenizer directory or hub repo has one of ``filenames``; return ``source``.

    transformers 5 builds an *empty* tokenizer, silently, when a repo's files are missing, so the
    files are looked up first (in the directory, or in the hub cache when ``HF_HUB_OFFLINE`` is set).

    Raises:
        MissingWeightsError: naming the source, the files and ``how`` to provide them.
    """
    if Path(source).is_dir():
        if any(Path(source, name).is_file() for name in filenames):
            return source
        reason = f"directory {source!r} has none of {', '.join(filenames)}"
    else:
        offline = hub_offline()
        from huggingface_hub import hf_hub_download

        for name in filenames:
            try:
                hf_hub_download(source, name, local_files_only=offline)
                return source
            except Exception:  # not cached / not downloadable: try the next name
                continue
        reason = (f"none of {', '.join(filenames)} from the Hugging Face repo {source} is "
                  + ("in the cache and HF_HUB_OFFLINE is set" if offline else "downloadable"))
    raise MissingWeightsError(f"reward {reward!r}: the tokenizer is not available: {reason}. {how}")
