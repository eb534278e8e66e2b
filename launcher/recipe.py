"""Loading a recipe file and parsing its config from the command line.

A recipe is a Python file that defines:

- `config`: a `TrainConfig` (subclass) instance, or a function returning one; its values are the CLI defaults;
- `build_model(cfg) -> nn.Module`;
- `build_datasets(cfg) -> Datasets`: the training and evaluation sets, whose items are (image, label) with the
  image a PIL image or a uint8/float CHW tensor; normalisation and augmentation are the library's (cfg.data).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import tyro
from torch import nn
from torch.utils.data import Dataset

from launcher.config import TrainConfig, from_dict
from launcher.errors import UserError

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class Datasets:
    """What a recipe's build_datasets returns."""

    train: Dataset
    eval: Dataset


@dataclass
class Recipe:
    name: str
    path: Path
    default: TrainConfig
    build_model: Callable[[Any], nn.Module]
    build_datasets: Callable[[Any], Datasets]


def available_recipes() -> list[Path]:
    """Recipe files under ./recipes and under the repository's recipes/ folder."""
    found: dict[Path, None] = {}
    for folder in (Path.cwd() / "recipes", REPO_RECIPES):
        if folder.is_dir():
            for p in sorted(folder.glob("*.py")):
                if not p.name.startswith("_"):
                    found[p.resolve()] = None
    return list(found)


def _relative(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        listing = "\n".join(f"  {_relative(p)}" for p in available_recipes()) or "  (none found)"
        raise UserError(f"recipe {str(path)!r} not found. Available recipes:\n{listing}")
    name = path.stem
    spec = importlib.util.spec_from_file_location(f"launcher_recipe_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UserError(
            f"recipe {_relative(path)} raised while loading:\n{_recipe_traceback(exc, path)}"
        ) from None
    return Recipe(
        name=name,
        path=path.resolve(),
        default=_recipe_config(module, path),
        build_model=_recipe_attr(module, "build_model", path),
        build_datasets=_recipe_attr(module, "build_datasets", path),
    )


def _recipe_traceback(exc: BaseException, path: Path) -> str:
    """The traceback from the recipe's first frame on: the importlib frames above it are noise."""
    frames = traceback.extract_tb(exc.__traceback__)
    target = str(path.resolve())
    start = next((i for i, f in enumerate(frames) if str(Path(f.filename).resolve()) == target), 0)
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames[start:])]
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines).rstrip()


def _recipe_attr(module: ModuleType, name: str, path: Path) -> Any:
    if not hasattr(module, name):
        raise UserError(f"recipe {_relative(path)} defines no `{name}`; see the README section on recipes")
    return getattr(module, name)


def _recipe_config(module: ModuleType, path: Path) -> TrainConfig:
    cfg = _recipe_attr(module, "config", path)
    if callable(cfg) and not isinstance(cfg, TrainConfig):
        cfg = cfg()
    if not isinstance(cfg, TrainConfig):
        raise UserError(f"recipe {_relative(path)}: `config` must be a TrainConfig instance, got {type(cfg)}")
    return cfg


def parse_config(recipe: Recipe, argv: Sequence[str], prog: str) -> TrainConfig:
    """Parse `argv` against the recipe's config; `--config FILE.json` (a run's config.json) replaces the defaults."""
    argv = list(argv)
    default = recipe.default
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a path to a config.json written by an earlier run")
        default = load_config_file(Path(argv[i + 1]), type(default))
        del argv[i : i + 2]
    # Under `accelerate launch` every rank parses; only rank 0 prints help and errors.
    is_main = os.environ.get("RANK", "0") == "0"
    cfg = tyro.cli(type(default), default=default, args=argv, prog=prog, console_outputs=is_main)
    return validate(cfg)


def load_config_file(path: Path, cls: type) -> TrainConfig:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"--config {path}: not valid JSON ({exc})") from None
    return from_dict(cls, data, where=str(path))


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks tyro cannot express: ranges and combinations. Each message names the flag."""
    problems = []
    positive = {
        "--data.batch-size": cfg.data.batch_size,
        "--data.eval-batch-size": cfg.data.eval_batch_size,
        "--grad-accum-steps": cfg.grad_accum_steps,
        "--logging.every-steps": cfg.logging.every_steps,
    }
    problems += [f"{flag} must be at least 1 (got {value})" for flag, value in positive.items() if value < 1]
    if cfg.max_epochs < 1 and cfg.max_steps is None:
        problems.append(f"--max-epochs must be at least 1 (got {cfg.max_epochs}), or set --max-steps")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        problems.append(f"--max-steps must be at least 1 (got {cfg.max_steps})")
    if cfg.optim.lr <= 0:
        problems.append(f"--optim.lr must be positive (got {cfg.optim.lr})")
    if cfg.checkpoint.keep_last < 1:
        problems.append(f"--checkpoint.keep-last must be at least 1 (got {cfg.checkpoint.keep_last})")
    if len(cfg.data.mean) != len(cfg.data.std):
        problems.append(
            f"--data.mean and --data.std need the same length ({cfg.data.mean} vs {cfg.data.std})"
        )
    if cfg.phase == "test" and cfg.weights is None:
        problems.append("--phase test needs --weights PATH (a .safetensors or torch.save state dict)")
    metrics = ("accuracy", "loss", "ema_accuracy", "ema_loss") if cfg.ema.decay > 0 else ("accuracy", "loss")
    if cfg.key_metric not in metrics:
        problems.append(f"--key-metric must be one of {', '.join(metrics)} (got {cfg.key_metric!r})")
    if not 0.0 <= cfg.ema.decay < 1.0:
        problems.append(f"--ema.decay must be in [0, 1) (got {cfg.ema.decay})")
    if cfg.schedule.warmup == "exponential" and cfg.schedule.warmup_start_factor <= 0:
        problems.append("--schedule.warmup-start-factor must be positive for the exponential warm-up")
    if problems:
        raise UserError("invalid configuration:\n  " + "\n  ".join(problems))
    return cfg
