"""The ``steerkit`` command line: parse, resolve defaults, call the library, write files.

    steerkit generate Sneaker Bag --method fk --particles 4        # bundled fashion-flow model
    steerkit generate "a red cube" --model path/to/sd --steps 30   # any diffusers pipeline

Every failure a user can cause (bad arguments, a missing device or weights, a broken model
directory, a full disk, a run too large for memory, a diverged sampler) is one line on stderr,
``steerkit: error: ...``, and exit status 2; anything else is one line and status 1. ``--debug``
(or ``STEERKIT_DEBUG=1``) prints the traceback as well. Warnings are one line each.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from steerkit.images import MAX_PIXELS
from steerkit.io import OutputInUse, OutputLock, atomic_write

METHODS = ("none", "fk", "best-of-n")
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddim-eta1": ("DDIMScheduler", {}),  # η = 1 is passed at call time
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-euler-stochastic": ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}),
    # steerkit.flow_sde: keeps the model's marginals (--noise-scale); the default for --method fk on flow models
    "flow-sde": ("FlowMatchSDEScheduler", {"stochastic_sampling": False}),
}


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


#: Set to 1 to print the traceback of an error, as ``--debug`` does.
DEBUG_ENV = "STEERKIT_DEBUG"
USER_ERRORS = (CliError, ValueError, TypeError, NotImplementedError, OutputInUse)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        raise CliError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number ≥ 0, got {text!r}")
    return value


def _fraction_pair(text: str, flag: str) -> tuple[float, float]:
    """``"START,END"`` → two floats; their range is checked by whatever takes the window."""
    try:
        start, end = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} expects START,END fractions of the trajectory, e.g. 0.2,1; got {text!r}") from None
    return start, end


def _step_list(text: str) -> list[int | float]:
    """``"0.6,0.7,0.8"`` (fractions of the trajectory) or ``"12,14,16"`` (0-based steps); FK checks the range."""
    values: list[int | float] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            values.append(int(part))
        except ValueError:
            try:
                values.append(float(part))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected a comma list of steps or fractions of the trajectory, e.g. 0.6,0.7,0.8; got {text!r}") from None
    return values


def _scale_list(text: str) -> list[float]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list of scales, e.g. 1,1.5,2,3")
    return [_non_negative_float(value) for value in values]


def _guidance_spec(text: str):
    """A plain number stays a number (the stock CFG path); anything else must parse as a schedule."""
    from steerkit.guidance import parse_schedule
    from steerkit.guidance.guiders import parse_combiner

    try:
        return _non_negative_float(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        return parse_combiner(text) or parse_schedule(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_debug(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help=f"on an error, print the traceback too (or set {DEBUG_ENV}=1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="steerkit", description="Inference-time steering for diffusers pipelines.")
    _add_debug(parser, False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    gen = commands.add_parser(
        "generate",
        help="generate images (offline on the bundled fashion-flow model by default)",
        description="Generate images with optional steering. Writes one PNG per image and run.json "
        "(configuration, seeds, versions, diagnostics) to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    gen.add_argument("items", nargs="*", metavar="PROMPT_OR_CLASS",
                     help="text prompts, or class names/ids for a class-conditional model "
                          "(default: every class of the bundled model)")
    gen.add_argument("--prompts-file", type=Path, help="one prompt or class per line (added to the positional ones)")
    gen.add_argument("--model", default="fashion-flow",
                     help="bundled model (fashion-flow, fashion-ddpm), a local diffusers directory, or a hub id")
    gen.add_argument("--method", default="none", choices=METHODS, help="steering method")
    gen.add_argument("--particles", type=_positive_int, default=4, help="particles per image for fk / best-of-n")
    gen.add_argument("--reward", default=None,
                     help="reward for fk / best-of-n (default for the bundled models: classifier:fashion)")
    gen.add_argument("--lmbda", type=_non_negative_float, default=10.0, help="FK temperature λ (tilt exp(λ·reward))")
    gen.add_argument("--potential", default="difference", help="FK potential: difference, max, sum or immediate")
    gen.add_argument("--resample-at", type=_step_list, default=None, metavar="STEPS",
                     help="FK scoring steps: fractions of the trajectory (0.6,0.7,0.8) or 0-based steps "
                          "(default: 20/40/60/80%%; score late for a classifier reward)")
    gen.add_argument("--ess-threshold", type=float, default=None, metavar="TAU",
                     help="FK resamples a prompt at a scoring step only when its ESS < TAU·particles "
                          "(default: at every scoring step)")
    gen.add_argument("--steps", type=_positive_int, default=20, help="denoising steps")
    gen.add_argument("--guidance", type=_guidance_spec, default=None,
                     help="CFG scale (diffusers convention, 1 = off) or a schedule: linear:1->7.5, cosine:1->7.5, "
                          "power:1->7.5,2, clamp-linear:4,1, interval:4,0.3,5 (σ band), piecewise:0=1,0.5=6,1=2; "
                          "or a combiner: apg:7.5[,eta,rescale], cfg-zero-star:4, cached-delta:7.5[,every[,start,end]], linear-ag:FILE.json; "
                          "default: the model's")
    gen.add_argument("--adaptive-guidance", type=float, default=None, metavar="THRESHOLD",
                     help="Adaptive Guidance: per sample, drop the unconditional pass once cos(cond, uncond) ≥ THRESHOLD")
    gen.add_argument("--dynamic-cfg", type=_scale_list, default=None, metavar="SCALES",
                     help="dynamic CFG: each step, each sample takes the candidate scale (comma list, e.g. "
                          "1,1.5,2,3,4) its --evaluator scores best on x̂0; --guidance is the prior")
    gen.add_argument("--evaluator", action="append", default=None,
                     help="evaluator reward for --dynamic-cfg (repeatable; default: classifier:evaluator)")
    gen.add_argument("--gfcg", type=_non_negative_float, default=None, metavar="SCALE",
                     help="gradient-free classifier guidance: push away from the classifier's reference class "
                          "with scale up to SCALE, on top of --guidance")
    gen.add_argument("--gfcg-rule", choices=["confusion", "margin", "constant"], default="confusion",
                     help="how the GFCG scale follows the classifier's probabilities")
    gen.add_argument("--gfcg-window", default="0.2,1", metavar="START,END",
                     help="fractions of the trajectory where GFCG is active (default 0.2,1: the first, blurry "
                          "x̂0 are skipped; 0,1: every step)")
    gen.add_argument("--gfcg-min-fraction", type=float, default=0.25, metavar="FRACTION",
                     help="samples whose GFCG scale is below FRACTION·SCALE (a classifier that is not confused) "
                          "get no push and no reference NFE (default 0.25)")
    gen.add_argument("--gfcg-classifier", default="classifier:evaluator",
                     help="GFCG classifier: a registry reward (zero-shot rewards such as clip work too)")
    gen.add_argument("--gfcg-labels", default=None,
                     help="text models: comma-separated labels the GFCG classifier chooses among")
    gen.add_argument("--gfcg-template", default="a photo of a {}", help="text models: the reference prompt")
    gen.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                     help="sampler (default: the model's; a stochastic one for fk: flow-sde on flow models, "
                          "ddpm otherwise)")
    gen.add_argument("--noise-scale", type=_non_negative_float, default=None, metavar="A",
                     help="flow-sde's noise scale a in g(σ) = a·√(σ/(1−σ)) (Flow-GRPO's noise_level; 0 is the "
                          "deterministic ODE sampler; default 0.7)")
    gen.add_argument("--height", type=_positive_int, default=None, help="image height in pixels (default: the model's)")
    gen.add_argument("--width", type=_positive_int, default=None, help="image width in pixels (default: the model's)")
    gen.add_argument("--num-images", type=_positive_int, default=1, help="images per prompt/class")
    gen.add_argument("--seed", type=int, default=0, help="base seed; row r uses seed + r")
    gen.add_argument("--max-batch", type=_positive_int, default=None, help="most rows per model call")
    gen.add_argument("--items-per-call", type=_positive_int, default=None,
                     help="prompts per pipeline call (default: all of a process's prompts in one call); the unit "
                          "of resuming and of sharding across processes. Fix it to get the same bytes on any "
                          "number of processes")
    gen.add_argument("--select", choices=["best", "sample", "all"], default="best",
                     help="fk / best-of-n: which particle(s) of each image to write: the highest final reward, "
                          "one drawn by FK's final weights (best-of-n: uniformly), or every particle "
                          "(files NNN-name-pJ.png); run.json records each image's reward (and FK weight)")
    gen.add_argument("--shard-particles", action="store_true",
                     help="under accelerate launch / torchrun with --method fk: split every prompt's particles "
                          "over the processes (each runs every call with particles/processes of them; FK "
                          "resamples across all) instead of dealing prompts to processes")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    gen.add_argument("--out", type=Path, default=Path("steerkit-out"), help="output directory")
    gen.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    _add_debug(gen, argparse.SUPPRESS)
    for name, help_text in (("invert", "find the noise that regenerates an image (FlowOpt)"),
                            ("edit", "edit an image toward a target class or prompt (FlowOpt)")):
        sub = commands.add_parser(name, help=help_text, description=help_text + ". Flow-matching models only.",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
        sub.add_argument("--model", default="fashion-flow", help="bundled model, local directory or hub id")
        sub.add_argument("--source", required=True, nargs="+",
                         help="the class (or prompt) of each image, or one for all")
        if name == "edit":
            sub.add_argument("--to", required=True, nargs="+", help="target class (or prompt), one or one per image")
            sub.add_argument("--guidance", type=_non_negative_float, default=2.0, help="target CFG scale")
        sub.add_argument("--steps", type=_positive_int, default=10 if name == "invert" else 15, help="T")
        sub.add_argument("--n-max", type=_positive_int, default=None, help="start at this many of the T steps")
        sub.add_argument("--iterations", type=_positive_int, default=20 if name == "invert" else 8)
        sub.add_argument("--step-size", type=_positive_float, default=None, help="η > 0 (default: half the estimated bound)")
        sub.add_argument("--tol", type=_non_negative_float, default=0.0, help="stop when every MSE is below this")
        sub.add_argument("--init", choices=["uniinv", "euler"], default="uniinv",
                         help="starting inversion: UniInv (as FlowOpt's reference code) or plain Euler ODE inversion")
        sub.add_argument("--init-iterations", type=_positive_int, default=1,
                         help="UniInv fixed-point iterations per step (1 = UniInv; more: closer to exact)")
        sub.add_argument("--acceleration", choices=["anderson", "none"], default="anderson" if name == "invert" else "none",
                         help="Anderson mixing of the FlowOpt iterates, or the paper's plain iteration")
        sub.add_argument("--resize", action="store_true", help="resize images to the model's size")
        sub.add_argument("--max-pixels", type=_positive_int, default=MAX_PIXELS,
                         help="refuse larger images, before decoding them")
        sub.add_argument("--device", default=None)
        sub.add_argument("--out", type=Path, default=Path(f"steerkit-{name}"))
        sub.add_argument("--overwrite", action="store_true")
        _add_debug(sub, argparse.SUPPRESS)
    from steerkit.compare import add_compare_parser  # `steerkit compare` lives in compare.py

    _add_debug(add_compare_parser(commands), argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line's one error boundary: whatever fails, one line on stderr and a non-zero status."""
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    # Known before parsing, so that a failure of the parser itself can be debugged too.
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv
    with _one_line_warnings():
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            args.argv = argv
            if args.command is None:
                parser.print_help()
                return 2
            if args.command == "generate":
                generate_command(args)
            elif args.command in ("invert", "edit"):
                flowopt_command(args)
            elif args.command == "compare":
                args.handler(args)
            return 0
        except KeyboardInterrupt:
            print("steerkit: interrupted", file=sys.stderr)
            return 130
        except Exception as error:
            if debug:
                traceback.print_exc()
            message, status = describe_error(error)
            print(f"steerkit: error: {message}", file=sys.stderr)
            return status


def one_line(text: Any, limit: int = 600) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def _out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def describe_error(error: BaseException) -> tuple[str, int]:
    """``(one-line message, exit status)`` for an exception that reached :func:`main`.

    Status 2 for everything a user can cause and fix (arguments, files, devices, weights, disk,
    memory, diverged runs); 1 for what is steerkit's own fault (the message then says so).
    """
    if isinstance(error, USER_ERRORS):
        return one_line(error), 2
    if _out_of_memory(error):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"out of memory ({one_line(first, 200)}); lower --particles, --num-images or --max-batch, or pass "
                "--items-per-call to make smaller calls"), 2
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename else ""
        if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return (f"no space left on the device{where}: free some space or choose another --out (steerkit "
                    "generate then resumes what was done)"), 2
        return f"{error.strerror or one_line(error) or type(error).__name__}{where}", 2
    return (f"{type(error).__name__}: {one_line(error)} (an internal error; rerun with --debug for the traceback "
            "and please report it)"), 1


@contextlib.contextmanager
def _one_line_warnings():
    """Show each warning as one ``steerkit: warning: ...`` line on stderr while the command runs."""

    def show(message, category, filename, lineno, file=None, line=None):
        label = "" if category is UserWarning else f"{category.__name__}: "
        print(f"steerkit: warning: {label}{one_line(message)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


# --- generate ---------------------------------------------------------------------------------


def read_lines_file(path: Path, flag: str, comments: bool = False) -> list[tuple[int, str]]:
    """The non-blank lines of ``path`` as ``(line number, text)`` (``#`` comments dropped if asked).

    A file with none is an error: an empty list must never fall back to a default.
    """
    if not path.is_file():
        raise CliError(f"{flag} {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CliError(f"{flag} {str(path)!r} is not UTF-8 text: {error.reason} at byte {error.start}") from None
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = (line.split("#", 1)[0] if comments else line).strip()
        if line:
            lines.append((number, line))
    if not lines:
        raise CliError(f"{flag} {str(path)!r} is empty: it holds no {'entries' if comments else 'prompts'}")
    return lines


def _read_items(args) -> list[str]:
    items = list(args.items)
    if args.prompts_file is not None:
        items += [line for _, line in read_lines_file(args.prompts_file, "--prompts-file")]
    return items


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower()[:limit] or "image"


def quiet_loading() -> None:
    """No progress bars while diffusers and transformers load components (sampling keeps its bar)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.disable_progress_bar()


class _NoErrorRecords:
    """A logging filter that drops ERROR records: a loader that logs one also raises, and the
    exception becomes the command's one line."""

    @staticmethod
    def filter(record) -> bool:
        return record.levelno < 40  # logging.ERROR


@contextlib.contextmanager
def loading_quietly():
    """While components load: no progress bars, and no ERROR log lines from diffusers/transformers."""
    import logging

    quiet_loading()
    handlers = [h for name in ("diffusers", "transformers") for h in logging.getLogger(name).handlers]
    for handler in handlers:
        handler.addFilter(_NoErrorRecords)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(_NoErrorRecords)


def _check_output_dir(out: Path, names: list[str], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        raise CliError(f"cannot write to --out {str(out)!r}: {error.strerror or error}") from None
    clashes = [name for name in names if (out / name).exists()]
    if clashes and not overwrite:
        raise CliError(f"{out / clashes[0]} already exists ({len(clashes)} output files would be replaced); "
                       "pass --overwrite or choose another --out")


def _scheduler_for(pipe, name: str | None, method: str, noise_scale: float | None = None):
    """The scheduler to use; for resampling methods default to a stochastic one (FK needs it).

    Flow models get steerkit's marginal-preserving ``flow-sde`` for FK; ``noise_scale`` is its noise
    scale (``None``: the scheduler's default).
    """
    import diffusers

    import steerkit.flow_sde
    from steerkit.schedulers import is_flow_scheduler

    flow = is_flow_scheduler(pipe.scheduler)
    if name is None and method == "fk":
        name = "flow-sde" if flow else "ddpm"
    if noise_scale is not None and name != "flow-sde":
        chosen = name or "the model's own sampler"
        raise CliError(f"--noise-scale applies to the flow-sde sampler, not to {chosen}")
    if name is None:
        return pipe.scheduler, None
    class_name, overrides = SCHEDULERS[name]
    if flow != class_name.startswith("FlowMatch"):
        kind = "flow-matching" if flow else "diffusion (ε/v)"
        raise CliError(f"--scheduler {name} does not fit this {kind} model")
    if noise_scale is not None:
        overrides = {**overrides, "noise_scale": noise_scale}
    if class_name.startswith("FlowMatch") and "shift" not in pipe.scheduler.config:
        # A flow-sigma DPM-Solver config (SANA's) names its shift flow_shift; keep it.
        overrides = {"shift": pipe.scheduler.config.get("flow_shift", 1.0), **overrides}
    scheduler_class = getattr(diffusers, class_name, None) or getattr(steerkit.flow_sde, class_name)
    return scheduler_class.from_config(pipe.scheduler.config, **overrides), name


def _stock_parameters(pipe) -> dict[str, Any]:
    """The parameters of the stock pipeline's call."""
    import inspect

    from steerkit.pipelines.base import _stock_class

    return dict(inspect.signature(_stock_class(type(pipe)).__call__).parameters)


def pipe_default_scale(pipe) -> float:
    """The stock default ``guidance_scale`` of the pipeline's call."""
    return _stock_parameters(pipe)["guidance_scale"].default


def stock_cfg(pipe, scale: float):
    """The stock call's ``guidance_scale`` as the base of a steerkit guidance: the number itself
    (diffusers' convention), or the family's own CFG where its convention differs (Z-Image: 1 + s)."""
    convert = getattr(getattr(type(pipe), "adapter_class", None), "stock_cfg", None)
    return scale if convert is None else convert(scale)


def resolve_reward(spec: str, flag: str):
    """The registry reward ``spec`` names, loaded now: an unknown name or missing weights fail
    before any work, with the flag that asked for it."""
    from steerkit.rewards import get_reward

    try:
        return get_reward(spec)
    except MemoryError:
        raise
    except Exception as error:  # loaders raise ValueError, FileNotFoundError, RuntimeError, OSError, ...
        raise CliError(f"{flag} {spec!r}: {one_line(error)}") from None


def probe_reward(reward, flag: str, spec: str, pipe, device, prompts: list[Any]) -> None:
    """Score one blank image per prompt (the first 64 distinct ones) on ``device``, before the run:
    a reward that cannot score these prompts (a classifier asked about a text prompt) fails now."""
    import torch

    if getattr(reward, "input_space", "pixels") != "pixels":
        return
    distinct = list(dict.fromkeys(prompts))[:64]
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    channels = 3 if getattr(pipe, "vae", None) is not None else int(getattr(model.config, "in_channels", 3))
    size = getattr(model.config, "sample_size", 32) if getattr(pipe, "vae", None) is None else 224
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    blank = torch.full((len(distinct), channels, size, size), 0.5, device=device)
    try:
        with torch.no_grad():
            reward.score(blank, distinct)
    except MemoryError:
        raise
    except Exception as error:
        raise CliError(f"{flag} {spec!r} cannot score this run's prompts: {one_line(error)}") from None


def _hooks_for(args, is_class_conditional: bool, group=None) -> tuple[list[Any], str | None]:
    if args.method == "none":
        return [], None
    reward = args.reward or ("classifier:fashion" if is_class_conditional else None)
    if reward is None:
        raise CliError(f"--method {args.method} needs --reward for this model")
    from steerkit.smc import BestOfN, FKSteering, ShardedFKSteering

    scorer = resolve_reward(reward, "--reward")
    if args.method == "fk":
        options = dict(reward=scorer, lmbda=args.lmbda, potential=args.potential, resample_at=args.resample_at,
                       ess_threshold=args.ess_threshold, seed=args.seed)
        try:
            fk = (ShardedFKSteering(**options, group=group, select=args.select) if args.shard_particles
                  else FKSteering(**options, select=args.select))
            fk.scoring_steps(args.steps)  # steps outside the trajectory: fail before sampling
        except ValueError as error:
            raise CliError(str(error)) from None
        return [fk], reward
    return [BestOfN(reward=scorer, select=args.select, seed=args.seed)], reward


def _feedback_guidance(args, guidance, default_scale, is_class_conditional: bool):
    """Wrap the static guidance in dynamic CFG and/or GFCG, as the flags ask (dynamic CFG innermost)."""
    from steerkit.guidance import DynamicGuidance, GradientFreeClassifierGuidance

    base = guidance if guidance is not None else default_scale
    try:
        if args.dynamic_cfg is not None:
            guidance = base = DynamicGuidance(args.evaluator or ["classifier:evaluator"], candidates=args.dynamic_cfg,
                                              prior=base)
        if args.gfcg is not None:
            labels = None
            if args.gfcg_labels:
                labels = [label.strip() for label in args.gfcg_labels.split(",") if label.strip()]
            elif not is_class_conditional:
                raise CliError("--gfcg on a text model needs --gfcg-labels (the classes the classifier chooses among)")
            guidance = GradientFreeClassifierGuidance(base=base, classifier=args.gfcg_classifier, scale=args.gfcg,
                                                      rule=args.gfcg_rule, labels=labels, template=args.gfcg_template,
                                                      window=_fraction_pair(args.gfcg_window, "--gfcg-window"),
                                                      min_fraction=args.gfcg_min_fraction)
    except (ValueError, TypeError) as error:
        raise CliError(str(error)) from None
    if args.evaluator and args.dynamic_cfg is None:
        raise CliError("--evaluator only applies with --dynamic-cfg")
    return guidance


def generate_command(args) -> dict[str, Any]:
    from steerkit import environment
    from steerkit.distributed import ParticleShards, ShardedGeneration, process_group
    from steerkit.models import load_pipeline, resolve_model_path
    from steerkit.pipelines.class_conditional import ClassConditionalUNetPipeline
    from steerkit.preflight import check_memory, resolve_device

    items = _read_items(args)
    device = resolve_device(args.device)
    group = process_group(args.device)  # one process, unless started by accelerate launch / torchrun
    if group.world_size > 1 and args.device in (None, "cuda"):
        device = str(group.device)  # each process on its own GPU
    particles = args.particles if args.method != "none" else 1
    if args.shard_particles and args.method != "fk":
        raise CliError("--shard-particles splits FK's particles over the processes; it needs --method fk")
    if args.shard_particles and particles % group.world_size:
        raise CliError(f"--shard-particles: --particles {particles} does not split over {group.world_size} "
                       f"processes; give a multiple of {group.world_size}")
    local_particles = particles // group.world_size if args.shard_particles else particles
    if args.select != "best" and args.method == "none":
        raise CliError(f"--select {args.select} picks among particles; it needs --method fk or best-of-n")
    # One file per output: per image, or with --select all per particle (then each particle is an
    # output of its own, and output o is the call's row o, so seeds are unchanged).
    outputs_per_image = particles if args.select == "all" else 1
    _check_output_dir(args.out, [], args.overwrite)
    started = time.perf_counter()
    with loading_quietly():
        pipe = load_pipeline(args.model, device=device)
    is_class_conditional = isinstance(pipe, ClassConditionalUNetPipeline)
    if is_class_conditional:
        id2label = pipe.config.get("id2label") or {}
        items = items or [id2label.get(str(i), str(i)) for i in range(pipe.num_classes)]
        # Unknown class names fail here, before any work; rewards see the label names.
        reward_prompts = [id2label.get(str(i), str(i)) for i in pipe.get_label_ids(items)]
    elif not items:
        raise CliError("give at least one prompt (positional or --prompts-file)")
    else:
        reward_prompts = items
    # Everything the run needs is built and checked before it starts: nothing below fails
    # because of an argument once run.json says "running".
    per_call = args.items_per_call or (len(items) if args.shard_particles else -(-len(items) // group.world_size))
    per_call = min(per_call, len(items))
    # Qwen-Image's stock default guidance_scale is None (it guides with true_cfg_scale).
    scale = args.guidance if isinstance(args.guidance, float) else pipe_default_scale(pipe) if args.guidance is None else 1
    check_memory(pipe, device, rows=per_call * args.num_images * local_particles, steps=args.steps,
                 branches=(2 if (scale or 1.0) > 1 else 1) + (args.gfcg is not None),
                 outputs=len(items) * args.num_images * outputs_per_image, max_batch=args.max_batch,
                 what=f"{per_call} prompt(s) × --num-images {args.num_images} × --particles {local_particles}")
    if args.shard_particles and not group.is_main:
        pipe.set_progress_bar_config(disable=True)  # every process runs the same steps; one bar is enough
    hooks, reward = _hooks_for(args, is_class_conditional, group)
    if hooks:
        probe_reward(hooks[0].reward, "--reward", reward, pipe, device, reward_prompts)
    if args.evaluator and args.dynamic_cfg is None:
        raise CliError("--evaluator only applies with --dynamic-cfg")
    for spec in (args.evaluator or ["classifier:evaluator"]) if args.dynamic_cfg is not None else []:
        probe_reward(resolve_reward(spec, "--evaluator"), "--evaluator", spec, pipe, device, reward_prompts)
    if args.gfcg is not None:
        resolve_reward(args.gfcg_classifier, "--gfcg-classifier")
    scheduler, scheduler_name = _scheduler_for(pipe, args.scheduler, args.method, args.noise_scale)
    if args.shard_particles:
        from steerkit.schedulers import keeps_solver_history

        if keeps_solver_history(scheduler):
            raise CliError(f"--shard-particles needs a scheduler without solver history (ddpm, ddim, euler, "
                           f"euler-ancestral, flow-euler*, flow-sde); {type(scheduler).__name__} keeps per-row history")
    pipe.scheduler = scheduler
    call: dict[str, Any] = dict(num_inference_steps=args.steps, num_images_per_prompt=args.num_images,
                                output_type="np")  # NaN survives in floats; the PNGs are made below
    for side in ("height", "width"):
        if getattr(args, side) is not None:
            if is_class_conditional or side not in _stock_parameters(pipe):
                raise CliError(f"--{side}: {type(pipe).__name__} takes no image size (it samples at its own size)")
            call[side] = getattr(args, side)
    prompt_key = "class_labels" if is_class_conditional else "prompt"
    guidance = None
    if isinstance(args.guidance, float):
        call["guidance_scale"] = args.guidance
    elif args.guidance is not None:
        guidance = args.guidance
    guidance = _feedback_guidance(args, guidance, stock_cfg(pipe, call.get("guidance_scale", pipe_default_scale(pipe))),
                                  is_class_conditional)
    if args.adaptive_guidance is not None:
        from steerkit.guidance import AdaptiveGuidance

        base = guidance if guidance is not None else stock_cfg(pipe, call.get("guidance_scale", pipe_default_scale(pipe)))
        guidance = AdaptiveGuidance(base, threshold=args.adaptive_guidance)
    if args.scheduler == "ddim-eta1":
        call["eta"] = 1.0

    labels = [item for item in items for _ in range(args.num_images)]
    names = [f"{i:03d}-{_slug(label)}.png" for i, label in enumerate(labels)]
    if outputs_per_image > 1:
        names = [f"{i:03d}-{_slug(label)}-p{j}.png" for i, label in enumerate(labels) for j in range(particles)]
    config = {k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v))
              for k, v in vars(args).items() if k not in ("argv", "debug")}
    # What must match for a rerun to resume the run in --out (not where it writes, nor how many processes).
    fingerprint = {**{k: v for k, v in config.items() if k not in ("out", "overwrite")}, "resolved_items": items}
    command = ["steerkit", *getattr(args, "argv", [])]
    here = environment.describe(device)
    processes = group.all_gather_object({key: here[key] for key in ("host", "cpu", "device", "torch_threads",
                                                                     "interop_threads")})
    record = {
        "command": command,
        "config": config,
        "resolved": {
            "model": args.model,
            "model_path": resolve_model_path(args.model),
            "pipeline": type(pipe).__name__,
            "scheduler": type(scheduler).__name__,
            "scheduler_config": dict(scheduler.config),
            "scheduler_choice": scheduler_name,
            "guidance": repr(guidance) if guidance is not None else call.get("guidance_scale"),
            "particles": particles,
            "particle_processes": group.world_size if args.shard_particles else 1,
            "reward": reward,
            "device": device,
            "seeds": [args.seed + r for r in range(len(labels) * particles)],
        },
        "versions": here.pop("versions"),
        # What a rerun needs to reproduce these bytes (README: "Reproducibility").
        "reproducibility": {**here, "processes": processes},
    }
    with ShardedGeneration(args.out, items, names, seed=args.seed,
                           images_per_item=args.num_images * outputs_per_image,
                           particles=particles // outputs_per_image, items_per_call=args.items_per_call,
                           fingerprint=fingerprint, overwrite=args.overwrite, group=group,
                           shard="particles" if args.shard_particles else "prompts", command=command) as run:
        if run.clash:
            raise CliError(run.describe_clash())
        run.begin(record)
        nfe = 0
        # One pipeline call per chunk of prompts; run.json's "images" lists every image with its seed.
        for chunk in run.my_chunks():
            for hook in hooks:  # resampling draws depend on the chunk, never on the process or earlier chunks
                hook.seed = args.seed + chunk.rows.start
            shards = my_rows = None
            if args.shard_particles:  # this process's particles of every prompt, seeded by their global rows
                shards = ParticleShards(len(chunk.items) * args.num_images, local_particles, group)
                my_rows = shards.global_rows()
            output = pipe(**call, **{prompt_key: [items[i] for i in chunk.items]},
                          generator=chunk.generators(device, my_rows), guidance=guidance, hooks=hooks,
                          num_particles=local_particles, max_batch=args.max_batch)
            trace = output.steering
            nfe += trace.total_nfe
            images = list(output.images)
            diagnostics = trace.to_dict()
            if args.shard_particles:
                diagnostics = _all_processes_nfe(diagnostics, group, particles)
                if args.select == "all":
                    images = shards.gather_objects(images)
            images = finite_pngs(pipe, images, [run.file_names[o] for o in chunk.outputs])
            rows = trace.extras.get("selected_rows") if outputs_per_image == 1 else None
            run.save(chunk, images, selected_rows=rows, diagnostics=diagnostics,
                     image_fields=_image_scores(trace.extras, rows, len(images)))
        record = run.finish({"wall_time_s": time.perf_counter() - started})
    attempt = record["attempts"][-1]
    nfe = sum(group.all_gather_object(nfe))
    group.close()
    if group.is_main:
        resumed = f" (resumed; {len(run.done)} already done)" if run.resuming else ""
        print(f"wrote {attempt['images_done']} image(s) and run.json to {args.out}{resumed} — {nfe} NFEs, "
              f"{record['wall_time_s']:.1f} s")
    return record


def finite_pngs(pipe, images, names: list[str]) -> list[Any]:
    """Float images ``[H, W, C]`` in [0, 1] → PIL images, exactly as the pipeline's ``output_type="pil"``
    would make them; a non-finite value is an error naming the images (a diverged sampler)."""
    import numpy as np
    from diffusers.image_processor import VaeImageProcessor

    bad = [name for name, image in zip(names, images) if not np.isfinite(image).all()]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CliError(f"the sampler diverged: {bad[0]}{more} {'hold' if more else 'holds'} NaN or infinite values "
                       "(nothing was written for them); lower --guidance or change --steps or --scheduler")
    to_pil = getattr(getattr(pipe, "image_processor", None), "numpy_to_pil", VaeImageProcessor.numpy_to_pil)
    return to_pil(np.stack(images)) if len(images) else []


def _image_scores(extras: dict[str, Any], selected_rows: list[int] | None, count: int) -> list[dict[str, Any]] | None:
    """Each written image's final reward (and FK weight), from the call's diagnostics."""
    method = extras.get("fk") or extras.get("best_of_n")
    if method is None:
        return None
    rewards = method["final_rewards"]
    weights = [w for prompt in method["final_weights"] for w in prompt] if "final_weights" in method else None
    rows = selected_rows if selected_rows is not None else range(count)
    return [{"reward": rewards[row], **({"weight": weights[row]} if weights is not None else {})} for row in rows]


def _all_processes_nfe(diagnostics: dict[str, Any], group, particles: int) -> dict[str, Any]:
    """One call's diagnostics with the NFEs of every process that shared its particles (each counts its own)."""
    per_process = group.all_gather_object(diagnostics["nfe"])
    branches = dict.fromkeys(branch for counts in per_process for branch in counts)  # a process may skip one
    total = {branch: sum(counts.get(branch, 0) for counts in per_process) for branch in branches}
    return {**diagnostics, "nfe": total, "total_nfe": sum(total.values()), "nfe_per_process": per_process,
            "num_particles": particles, "local_particles": diagnostics["num_particles"]}


# --- invert / edit ----------------------------------------------------------------------------


def _per_image(values: list[str], count: int, flag: str) -> list[str]:
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise CliError(f"{flag} takes one value or one per image ({count}), got {len(values)}")
    return values


def _load_images(paths: list[Path], pipe, resize: bool, max_pixels: int = MAX_PIXELS):
    """The images as ``[B, C, H, W]`` in [0, 1], in the model's channels (:mod:`steerkit.images`: every mode)."""
    import numpy as np
    import torch

    from steerkit.images import image_to_array, open_image

    config = getattr(pipe, "unet", None) and pipe.unet.config
    channels = config.in_channels if config is not None else 3
    size = config.sample_size if config is not None else None
    arrays = []
    for path in paths:
        image = open_image(path, max_pixels)
        arrays.append(image_to_array(image, 1 if channels == 1 else 3, (size, size) if resize and size else None))
    if len({a.shape for a in arrays}) != 1:
        raise CliError("all images must have the same size (or pass --resize)")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _best_iterates(result) -> list[int]:
    """For each image, the iteration whose iterate FlowOpt returned (the lowest finite loss)."""
    best = []
    for problem in range(len(result.loss[0])):
        losses = [(loss[problem], k) for k, loss in enumerate(result.loss) if math.isfinite(loss[problem])]
        best.append(min(losses)[1] if losses else 0)
    return best


def flowopt_command(args) -> dict[str, Any]:
    import torch

    from steerkit.flowopt import edit, invert
    from steerkit.models import load_pipeline
    from steerkit.pipelines.class_conditional import ClassConditionalUNetPipeline
    from steerkit.preflight import check_memory, resolve_device

    device = resolve_device(args.device)
    count = len(args.images)
    names = [f"{i:03d}-{_slug(p.stem)}.png" for i, p in enumerate(args.images)]
    extra = [f"{i:03d}-{_slug(p.stem)}-regenerated.png" for i, p in enumerate(args.images)] if args.command == "edit" else []
    _check_output_dir(args.out, [*names, *extra, "run.json", "latents.safetensors"], args.overwrite)
    command = ["steerkit", *getattr(args, "argv", [])]
    with OutputLock(args.out, command):
        with loading_quietly():
            pipe = load_pipeline(args.model, device=device)
        key = "class_labels" if isinstance(pipe, ClassConditionalUNetPipeline) else "prompt"
        images = _load_images(args.images, pipe, args.resize, args.max_pixels)
        source = _per_image(args.source, count, "--source")
        check_memory(pipe, device, rows=count, steps=args.steps * (args.iterations + 2), branches=2)
        options = dict(num_inference_steps=args.steps, n_max=args.n_max, iterations=args.iterations,
                       step_size=args.step_size, tol=args.tol, init=args.init, init_iterations=args.init_iterations,
                       acceleration=None if args.acceleration == "none" else args.acceleration)
        if args.command == "invert":
            result = invert(pipe, images, **{key: source}, **options)
            baseline = None
        else:
            target = _per_image(args.to, count, "--to")
            result = edit(pipe, images, source={key: source}, target={key: target}, target_guidance=args.guidance,
                          **options)
            baseline = result.initial_output
        from PIL import Image
        from safetensors.torch import save_file

        if not bool(torch.isfinite(result.latents).all()):
            raise CliError(f"FlowOpt diverged: the returned latents hold NaN or infinite values (step size "
                           f"{max(result.step_size):.4g}); lower --step-size or leave it to the estimate")
        pixel_sets = [(pipe_decode(pipe, result.output), names)]
        if baseline is not None:
            pixel_sets.append((pipe_decode(pipe, baseline), extra))
        for pixels, files in pixel_sets:
            bad = [name for name, image in zip(files, pixels) if not bool(torch.isfinite(image).all())]
            if bad:
                raise CliError(f"FlowOpt diverged: {bad[0]} would hold NaN or infinite values; lower --step-size "
                               "or leave it to the estimate")
        for pixels, files in pixel_sets:
            for name, image in zip(files, pixels):
                array = (image.permute(1, 2, 0).cpu().numpy() * 255).round().clip(0, 255).astype("uint8")
                picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
                atomic_write(args.out / name, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
        atomic_write(args.out / "latents.safetensors",
                     lambda tmp: save_file({"latents": result.latents.contiguous().cpu()}, tmp))
        from steerkit import environment

        here = environment.describe(device)
        record = {"command": command, "images": [str(p) for p in args.images], "outputs": names, "regenerated": extra,
                  "result": result.to_dict(), "versions": here.pop("versions"), "reproducibility": here}
        atomic_write(args.out / "run.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2, default=str)))
    best = _best_iterates(result)
    psnr = [result.psnr[k][i] for i, k in enumerate(best)] if result.psnr else []
    psnr_line = f", PSNR {sum(psnr) / count:.2f} dB" if psnr else ""
    print(f"{args.command}: {len(result.loss) - 1} iteration(s), {result.nfe} NFEs, stopped by {result.stopped}"
          f"{psnr_line}; wrote {args.out}")
    return record


def pipe_decode(pipe, latents):
    """Latents → images in [0, 1] through the pipeline's adapter."""
    import torch

    with torch.no_grad():
        return type(pipe).adapter_class(pipe).decode(latents)


if __name__ == "__main__":
    sys.exit(main())
