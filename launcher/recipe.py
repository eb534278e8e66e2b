"""Loading a recipe file and parsing its config from the command line.

A recipe is a Python file that defines:

- `config`: a `TrainConfig` (subclass) instance, or a function returning one; its values are the CLI defaults;
- `build_model(cfg) -> nn.Module`;
- `build_datasets(cfg) -> Datasets`: the training and evaluation sets, whose items are (image, label) with the
  image a PIL image or a uint8/float CHW tensor; normalisation and augmentation are the library's (cfg.data).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import sys
import traceback
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import tyro
import yaml
from torch import nn
from torch.utils.data import Dataset

from launcher.config import TrainConfig, from_dict, to_dict
from launcher.errors import UserError
from launcher.task import Classification, Task

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
    build_task: Callable[[Any], Task] | None = None
    """The recipe's `build_task(cfg)`, if it defines one; otherwise the task is image classification."""
    fsdp_units: Callable[[nn.Module], Any] | None = None
    """The recipe's `fsdp_units(model)`: the submodules --parallel.strategy fsdp shards one by one (blocks)."""
    predict: Callable[[nn.Module, Any, Path], Any] | None = None
    """The recipe's `predict(model, cfg, run_dir)` for --phase predict (write predictions, sample text), if any."""

    def run_predict(self, model: nn.Module, cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
        """The recipe's `predict`, checked like `make_model`; what it returns (a dict) is the phase's result."""
        if self.predict is None:
            raise UserError(
                f"recipe {_relative(self.path)} defines no predict(model, cfg, run_dir), which --phase predict "
                "runs; use --phase test to evaluate weights"
            )
        with _recipe_code(self.path, "predict"):
            result = self.predict(model, cfg, run_dir)
        return result if isinstance(result, dict) else {}

    def make_task(self, cfg: TrainConfig) -> Task:
        """The recipe's task for `cfg` (`Classification()` when it defines no `build_task`), checked."""
        if self.build_task is None:
            return Classification()
        with _recipe_code(self.path, "build_task"):
            task = self.build_task(cfg)
        if not isinstance(task, Task):
            raise UserError(
                f"recipe {_relative(self.path)}: build_task returned a {type(task).__name__}, not a "
                "launcher.Task; return an instance of a Task subclass"
            )
        if "loss" not in task.metric_names:
            raise UserError(
                f"recipe {_relative(self.path)}: {type(task).__name__}.metric_names must include 'loss' "
                f"(got {task.metric_names})"
            )
        return task

    def make_model(self, cfg: TrainConfig) -> nn.Module:
        """The recipe's `build_model(cfg)`, checked: failures and a wrong result are the recipe's to fix."""
        with _recipe_code(self.path, "build_model"):
            model = self.build_model(cfg)
        if not isinstance(model, nn.Module):
            raise UserError(
                f"recipe {_relative(self.path)}: build_model returned a {type(model).__name__}, not a "
                "torch.nn.Module; return the model"
            )
        return model

    def make_datasets(self, cfg: TrainConfig) -> Datasets:
        """The recipe's `build_datasets(cfg)`, checked like `make_model`."""
        with _recipe_code(self.path, "build_datasets"):
            datasets = self.build_datasets(cfg)
        where = f"recipe {_relative(self.path)}: build_datasets returned"
        if not isinstance(datasets, Datasets):
            raise UserError(
                f"{where} a {type(datasets).__name__}, not a launcher.recipe.Datasets; "
                "return Datasets(train=..., eval=...)"
            )
        for split in ("train", "eval"):
            # The loader plans batches from len() and fetches by index: an iterable-only dataset cannot work.
            kind = type(getattr(datasets, split))
            if not (hasattr(kind, "__len__") and hasattr(kind, "__getitem__")):
                raise UserError(
                    f"{where} a {split} set of type {kind.__name__} without len(); return a map-style dataset "
                    "(__len__ and __getitem__)"
                )
        return datasets


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
        with _recipe_code(path, ""):
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)  # a half-run module is no module
        raise
    return Recipe(
        name=name,
        path=path.resolve(),
        default=_recipe_config(module, path),
        build_model=_recipe_attr(module, "build_model", path),
        build_datasets=_recipe_attr(module, "build_datasets", path),
        build_task=getattr(module, "build_task", None),
        predict=getattr(module, "predict", None),
        fsdp_units=getattr(module, "fsdp_units", None),
    )


def _recipe_traceback(exc: BaseException, path: Path) -> str:
    """The traceback from the recipe's first frame on: the importlib and launcher frames above it are noise,
    and so are importlib's frames below it (the recipe importing a module that fails)."""
    frames = traceback.extract_tb(exc.__traceback__)
    start = next((i for i, f in enumerate(frames) if _in_file(f, path)), 0)
    shown = [f for f in frames[start:] if not f.filename.startswith("<frozen importlib")]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(shown)]
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines).rstrip()


def _in_file(frame: traceback.FrameSummary, path: Path) -> bool:
    return Path(frame.filename).resolve() == path.resolve()


@contextlib.contextmanager
def _recipe_code(path: Path, what: str) -> Iterator[None]:
    """Around the recipe's own code: `what` is the function it runs (build_model, ...), or "" for the module.

    A UserError it raises is already a message for the user and passes unchanged; any other exception becomes
    one labelled as the recipe's, with the recipe's traceback. sys.exit (SystemExit, not an Exception) is an
    error too: a recipe that exits while loading must not look like a successful run. KeyboardInterrupt passes.
    """
    subject, when = (
        (f"recipe {_relative(path)}: {what}", "") if what else (f"recipe {_relative(path)}", " while loading")
    )
    try:
        yield
    except UserError:
        raise
    except SyntaxError as exc:
        if exc.filename is None or Path(exc.filename).resolve() != path.resolve():
            raise UserError(f"{subject} raised{when}:\n{_recipe_traceback(exc, path)}") from None
        # Raised by the compiler before any line of the recipe ran, so no frame of the traceback is the
        # recipe's: the file, line and caret are all there is to show.
        shown = "".join(traceback.format_exception_only(type(exc), exc)).rstrip()
        raise UserError(f"recipe {_relative(path)} has a syntax error:\n{shown}") from None
    except SystemExit as exc:
        lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if _in_file(f, path)]
        at = f" (line {lines[-1]})" if lines else ""
        code = "" if exc.code is None else repr(exc.code)
        if what:
            fix = "raise an exception that says what is wrong instead"
        else:
            fix = "a recipe only defines config, build_model and build_datasets: put script code under "
            fix += '`if __name__ == "__main__":`'
        raise UserError(f"{subject} called sys.exit({code}){when}{at}; {fix}") from None
    except Exception as exc:
        raise UserError(f"{subject} raised{when}:\n{_recipe_traceback(exc, path)}") from None


def _recipe_attr(module: ModuleType, name: str, path: Path) -> Any:
    if not hasattr(module, name):
        raise UserError(f"recipe {_relative(path)} defines no `{name}`; see the README section on recipes")
    return getattr(module, name)


def _recipe_config(module: ModuleType, path: Path) -> TrainConfig:
    cfg = _recipe_attr(module, "config", path)
    if callable(cfg) and not isinstance(cfg, TrainConfig):
        with _recipe_code(path, "config()"):
            cfg = cfg()
    if not isinstance(cfg, TrainConfig):
        raise UserError(f"recipe {_relative(path)}: `config` must be a TrainConfig instance, got {type(cfg)}")
    return cfg


CONFIG_HELP = (
    "Every field of the recipe's config is a flag. --config FILE (YAML, or a run's config.json) starts from that "
    "file instead of the recipe's values, and the flags override it; --print-config prints the resolved config as "
    "YAML, ready to edit and pass back with --config, and exits."
)


def parse_config(recipe: Recipe, argv: Sequence[str], prog: str) -> TrainConfig:
    """Parse `argv` against the recipe's config; `--config FILE` (YAML or JSON) replaces the recipe's values."""
    argv = list(argv)
    default = recipe.default
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise UserError("--config needs a path: a YAML file (see --print-config) or a run's config.json")
        default = load_config_file(Path(argv[i + 1]), type(default))
        del argv[i : i + 2]
    _check_flags(type(default), argv, prog)
    # Under `accelerate launch` every rank parses; only rank 0 prints help and errors.
    is_main = os.environ.get("RANK", "0") == "0"
    cfg = tyro.cli(
        type(default), default=default, args=argv, prog=prog, description=CONFIG_HELP, console_outputs=is_main
    )
    return validate(cfg, recipe.make_task(cfg).metric_names)


def _flags(cls: type, prefix: str = "") -> set[str]:
    """The flags tyro makes of a config class (`--optim.lr`, `--no-compile`), with `-` for `_`."""
    flags: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f.name.replace("_", "-")
        if dataclasses.is_dataclass(hints[f.name]):
            flags |= _flags(hints[f.name], f"{prefix}{name}.")
            continue
        flags.add(f"--{prefix}{name}")
        if hints[f.name] is bool:
            flags.add(f"--{prefix}no-{name}")
    return flags


def _check_flags(cls: type, argv: Sequence[str], prog: str) -> None:
    """An unknown flag is one line naming it and the closest real one. tyro's own message also lists the flag's
    value as an unknown option and points at a command that does not run."""
    known = _flags(cls) | {"--help"}
    for token in argv:
        if not token.startswith("--"):
            continue
        flag = token.split("=", 1)[0].replace("_", "-")
        if flag not in known:
            guess = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            hint = f"; did you mean {guess[0]}?" if guess else ""
            raise UserError(f"unknown flag {token.split('=', 1)[0]}{hint} (`{prog} --help` lists every flag)")


def config_yaml(cfg: TrainConfig, recipe: Recipe) -> str:
    """The resolved config as YAML, for --print-config: edit it and pass it back with --config."""
    header = (
        f"# {_relative(recipe.path)}: the resolved config (the recipe's values and the flags given).\n"
        f"# Train with it: python -m launcher.train {_relative(recipe.path)} --config THIS.yaml [--field VALUE]\n"
        f"# Every field: python -m launcher.train {_relative(recipe.path)} --help\n"
    )
    return header + yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=110)


def load_config_file(path: Path, cls: type) -> TrainConfig:
    """A config file: YAML (.yaml, .yml) or JSON (a run's config.json), read strictly (`from_dict`)."""
    kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "JSON"
    if path.is_dir():
        inside = path / "config.json"
        hint = (
            f"pass {inside}, the one inside it"
            if inside.is_file()
            else "pass a YAML file (see --print-config) or a run's config.json"
        )
        raise UserError(f"--config {path} is a directory; {hint}")
    try:
        text = path.read_text(encoding="utf-8")  # save_json writes ASCII; any locale
        data = yaml.safe_load(text) if kind == "YAML" else json.loads(text)
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except UnicodeDecodeError:
        raise UserError(f"--config {path}: not UTF-8 text; pass a YAML or JSON config file") from None
    except OSError as exc:
        raise UserError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        where = " ".join(str(exc).split())
        raise UserError(f"--config {path}: not valid {kind} ({where})") from None
    if not isinstance(data, dict):
        raise UserError(
            f"--config {path}: expected a mapping of config sections (as --print-config writes), got a "
            f"{type(data).__name__}"
        )
    return from_dict(cls, data, where=str(path))


# The range of a single value: what the message says it must be, and the test. Every float must also be finite
# (nan fails no comparison, so a rule alone would let it through).
Rule = tuple[str, Callable[[Any], bool]]
ANY: Rule = ("a finite number", lambda v: True)
AT_LEAST_0: Rule = ("at least 0", lambda v: v >= 0)
AT_LEAST_1: Rule = ("at least 1", lambda v: v >= 1)
POSITIVE: Rule = ("positive", lambda v: v > 0)
FRACTION: Rule = ("in [0, 1]", lambda v: 0 <= v <= 1)
BELOW_1: Rule = ("in [0, 1)", lambda v: 0 <= v < 1)  # momentum, betas, EMA decay: 1 would never forget
DECAY_FACTOR: Rule = ("in (0, 1]", lambda v: 0 < v <= 1)  # 0 would drop the lr to 0 at the first decay
SEED: Rule = (f"in [0, {2**32 - 1}]", lambda v: 0 <= v < 2**32)  # numpy's seed range (set_seed seeds it)
# The run directory is <output-dir>/<run-name>: anything but one plain name would put it elsewhere.
RUN_NAME: Rule = (
    "one directory name under --output-dir: not empty, not . or .., without / or \\",
    lambda v: v not in ("", ".", "..") and not any(c in v for c in "/\\\0"),
)


def _value_rules(cfg: TrainConfig) -> list[tuple[str, Any, Rule]]:
    """(flag, value, rule) for every value with a range of its own. None (unset) is skipped; the rule of a
    tuple holds for each of its items."""
    data, optim, sched, ckpt = cfg.data, cfg.optim, cfg.schedule, cfg.checkpoint
    return [
        ("--run-name", cfg.run_name, RUN_NAME),
        ("--seed", cfg.seed, SEED),
        ("--max-steps", cfg.max_steps, AT_LEAST_1),
        ("--grad-accum-steps", cfg.grad_accum_steps, AT_LEAST_1),
        ("--eval-every-epochs", cfg.eval_every_epochs, AT_LEAST_0),
        ("--eval-every-steps", cfg.eval_every_steps, AT_LEAST_0),
        ("--data.batch-size", data.batch_size, AT_LEAST_1),
        ("--data.eval-batch-size", data.eval_batch_size, AT_LEAST_1),
        ("--data.num-workers", data.num_workers, AT_LEAST_0),
        ("--data.prefetch-factor", data.prefetch_factor, AT_LEAST_1),
        ("--data.crop-padding", data.crop_padding, AT_LEAST_0),
        ("--data.mean", data.mean, ANY),
        ("--data.std", data.std, POSITIVE),  # normalisation divides by it
        ("--optim.lr", optim.lr, POSITIVE),
        ("--optim.momentum", optim.momentum, BELOW_1),
        ("--optim.weight-decay", optim.weight_decay, AT_LEAST_0),
        ("--optim.betas", optim.betas, BELOW_1),
        ("--optim.eps", optim.eps, AT_LEAST_0),
        ("--optim.grad-clip-norm", optim.grad_clip_norm, AT_LEAST_0),
        ("--schedule.warmup-epochs", sched.warmup_epochs, AT_LEAST_0),
        ("--schedule.warmup-steps", sched.warmup_steps, AT_LEAST_0),
        ("--schedule.warmup-start-factor", sched.warmup_start_factor, FRACTION),
        ("--schedule.min-lr-factor", sched.min_lr_factor, FRACTION),
        ("--schedule.step-size-epochs", sched.step_size_epochs, POSITIVE),
        ("--schedule.milestones-epochs", sched.milestones_epochs, AT_LEAST_0),
        ("--schedule.gamma", sched.gamma, DECAY_FACTOR),
        ("--schedule.plateau-patience", sched.plateau_patience, AT_LEAST_0),
        ("--schedule.plateau-threshold", sched.plateau_threshold, AT_LEAST_0),
        ("--checkpoint.every-steps", ckpt.every_steps, AT_LEAST_0),
        ("--checkpoint.every-epochs", ckpt.every_epochs, AT_LEAST_0),
        ("--checkpoint.keep-last", ckpt.keep_last, AT_LEAST_1),
        ("--logging.every-steps", cfg.logging.every_steps, AT_LEAST_1),
        ("--logging.peak-tflops", cfg.logging.peak_tflops, POSITIVE),
        ("--preemption.check-every-steps", cfg.preemption.check_every_steps, AT_LEAST_1),
        ("--preemption.max-requeues", cfg.preemption.max_requeues, AT_LEAST_0),
        ("--early-stopping.patience", cfg.early_stopping.patience, AT_LEAST_0),
        ("--early-stopping.min-delta", cfg.early_stopping.min_delta, AT_LEAST_0),
        ("--ema.decay", cfg.ema.decay, BELOW_1),
        ("--ema.warmup-steps", cfg.ema.warmup_steps, AT_LEAST_0),
    ]


def _range_problems(cfg: TrainConfig) -> list[str]:
    problems = []
    for flag, value, (expected, ok) in _value_rules(cfg):
        if value is None:
            continue
        items, each = (value, " each") if isinstance(value, tuple) else ((value,), "")
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            problems.append(f"{flag} must{each} be a finite number (got {value!r})")
        elif not all(ok(v) for v in items):
            problems.append(f"{flag} must{each} be {expected} (got {value!r})")
    return problems


def validate(cfg: TrainConfig, metric_names: Sequence[str] = ("loss", "accuracy")) -> TrainConfig:
    """Checks tyro cannot express: ranges (`_value_rules`) and combinations. Each message names the flag.
    `metric_names`: what the recipe's task evaluates, which --key-metric must name."""
    problems = _range_problems(cfg)
    optim, sched = cfg.optim, cfg.schedule
    # Combinations. Each compares with a value its own range allows, so one mistake is reported once.
    if cfg.max_epochs < 1 and cfg.max_steps is None:
        problems.append(f"--max-epochs must be at least 1 (got {cfg.max_epochs}), or set --max-steps")
    if len(cfg.data.mean) != len(cfg.data.std):
        problems.append(
            f"--data.mean and --data.std need the same length ({cfg.data.mean} vs {cfg.data.std})"
        )
    if cfg.phase in ("test", "predict") and cfg.weights is None:
        problems.append(f"--phase {cfg.phase} needs --weights PATH (a .safetensors or torch.save state dict)")
    names = sorted(metric_names)
    metrics = names + [f"ema_{name}" for name in names] if cfg.ema.decay > 0 else names
    if cfg.key_metric not in metrics:
        problems.append(f"--key-metric must be one of {', '.join(metrics)} (got {cfg.key_metric!r})")
    if optim.name == "sgd" and optim.nesterov and optim.momentum == 0:  # torch's SGD refuses it
        problems.append(
            "--optim.nesterov needs --optim.momentum above 0 (got 0.0); "
            "set a momentum or pass --optim.no-nesterov"
        )
    if cfg.parallel.strategy == "fsdp":
        # Not yet with sharded parameters: each needs its own handling of the shards (docs in the README).
        unsupported = {"--compile": cfg.compile,
                       "--mixed-precision fp16": cfg.mixed_precision == "fp16"}  # fmt: skip
        for flag in (flag for flag, used in unsupported.items() if used):
            problems.append(
                f"{flag} is not supported with --parallel.strategy fsdp yet; use ddp, or leave it out"
            )
    if sched.decay == "plateau" and sched.gamma == 1:  # torch's ReduceLROnPlateau refuses it
        problems.append("--schedule.gamma must be below 1 for --schedule.decay plateau (got 1.0)")
    if sched.warmup in ("exponential", "constant") and sched.warmup_start_factor == 0:
        # Exponential: 0 ** x is 0 throughout; constant: the warm-up would not train at all.
        problems.append(
            f"--schedule.warmup-start-factor must be positive for the {sched.warmup} warm-up (got 0.0)"
        )
    if problems:
        raise UserError("invalid configuration:\n  " + "\n  ".join(problems))
    return cfg
