"""The typed configuration every recipe extends.

A recipe subclasses `TrainConfig` (adding its own sections, such as `model`) and sets its defaults; tyro turns
every field into a command-line flag whose help text is the docstring under the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from launcher.errors import UserError


@dataclass(kw_only=True)
class DataConfig:
    root: Path = Path("data")
    """Dataset root directory (torchvision layout); datasets download there when online."""
    download: bool = True
    """Download the dataset into `root` when it is missing (needs a network)."""
    batch_size: int = 128
    """Samples per process per micro-batch (global batch = batch_size x processes x grad_accum_steps)."""
    eval_batch_size: int = 1000
    """Samples per process per evaluation batch."""
    in_memory: bool = True
    """Hold the whole dataset as one uint8 tensor on the training device and batch it there (no workers)."""
    num_workers: int = 2
    """DataLoader worker processes (only when in_memory is off)."""
    prefetch_factor: int = 2
    """Batches each DataLoader worker loads ahead (only with num_workers > 0). Raise it when loading time varies
    from batch to batch (slow storage, costly decoding), so the device does not wait on a slow batch."""
    shuffle: bool = True
    """Reshuffle the training set every epoch with a seed derived from (seed, epoch)."""
    drop_last: bool = True
    """Drop the last, incomplete global batch of each epoch (different samples every epoch)."""
    mean: tuple[float, ...] = ()
    """Per-channel mean for normalisation on the device (empty: no normalisation)."""
    std: tuple[float, ...] = ()
    """Per-channel standard deviation for normalisation on the device."""
    crop_padding: int = 0
    """Training augmentation: random crop of the original size after zero-padding by this many pixels (0: off)."""
    hflip: bool = False
    """Training augmentation: random horizontal flip with probability 1/2."""


@dataclass(kw_only=True)
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    """Optimizer."""
    lr: float = 0.1
    """Peak learning rate (the schedule multiplies it)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for AdamW, L2 for SGD and Adam)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW betas."""
    eps: float = 1e-8
    """Adam/AdamW epsilon."""
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm to this value (0: no clipping). The pre-clip norm is logged."""


@dataclass(kw_only=True)
class ScheduleConfig:
    warmup: Literal["none", "linear", "exponential", "constant"] = "none"
    """Warm-up shape: linear ramp, exponential (geometric) ramp, or a constant low lr."""
    warmup_epochs: float = 0.0
    """Warm-up length in epochs (fractions allowed); converted to optimizer steps."""
    warmup_steps: int | None = None
    """Warm-up length in optimizer steps; overrides warmup_epochs when set."""
    warmup_start_factor: float = 0.1
    """lr multiplier at the first warm-up step (the constant shape holds it for the whole warm-up)."""
    decay: Literal["constant", "cosine", "step", "multistep", "plateau"] = "cosine"
    """Decay after warm-up; plateau: multiply by gamma when the plateau metric stops improving."""
    min_lr_factor: float = 0.0
    """Cosine: final lr as a fraction of the peak lr. Plateau: the lowest lr, as a fraction of the peak."""
    step_size_epochs: float = 30.0
    """Step decay: multiply by gamma every this many epochs (counted from the start of training)."""
    milestones_epochs: tuple[float, ...] = (20.0, 40.0, 60.0)
    """Multi-step decay: multiply by gamma at each of these epochs (counted from the start of training)."""
    gamma: float = 0.1
    """Step, multi-step and plateau decay factor."""
    plateau_metric: Literal["key_metric", "loss"] = "key_metric"
    """Plateau: watch the key metric (in its mode) or the evaluation loss (lower is better)."""
    plateau_patience: int = 2
    """Plateau: evaluations without improvement before the lr is reduced."""
    plateau_threshold: float = 1e-4
    """Plateau: relative improvement that counts as one (torch's ReduceLROnPlateau threshold)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save a resumable checkpoint every this many optimizer steps (0: off)."""
    every_epochs: int = 1
    """Save a resumable checkpoint every this many epochs (0: off). One is always saved at the end."""
    keep_last: int = 2
    """Keep this many newest checkpoints; older ones are deleted after a new one is committed."""
    tolerate_save_failures: bool = False
    """Keep training (with a loud warning) when a checkpoint cannot be written, instead of stopping."""
    async_save: bool = False
    """Copy the checkpoint into host memory and write it in a background thread: training waits only for the copy
    (docs/benchmarks.md), at the cost of host memory for one more copy of the weights and optimizer state. A failed
    save is reported at the next save or at the end of training."""


@dataclass(kw_only=True)
class LoggingConfig:
    every_steps: int = 50
    """Read the loss back from the device, log it and update the progress bar every this many steps."""
    progress_bar: bool = True
    """Show a progress bar on the main process when stderr is a terminal; otherwise (a log file, CI, SLURM), and
    with this off, each logging step is one log line."""
    trackers: tuple[Literal["tensorboard", "wandb", "mlflow"], ...] = ("tensorboard",)
    """Experiment trackers, several at once (Accelerate's): tensorboard (<run>/tensorboard), wandb (WANDB_MODE=offline
    keeps it in <run>/wandb), mlflow (a file store in <run>/mlruns unless MLFLOW_TRACKING_URI is set). wandb and
    mlflow need their extras (pip install -e '.[wandb]'). No names: none (metrics.jsonl is always written)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for the run's precision, for MFU (model FLOPs utilisation). Unset: the
    figure of a known GPU (launcher/throughput.py: A100, H100, H200, L4, L40S, ...); on a CPU or an unknown GPU
    MFU is n/a."""
    lr_every_step: bool = True
    """Log the lr of every optimizer step to TensorBoard (off, and in other trackers: only at logging steps). Costs
    ~30-90 us per step on a CPU (tensorboard's writer checksums every event in Python): only models whose steps
    take well under 10 ms notice."""


@dataclass(kw_only=True)
class ParallelConfig:
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every process holds the whole model (DistributedDataParallel). fsdp: parameters, gradients and optimizer
    state are sharded across the processes (FSDP2 `fully_shard`, the recipe's `fsdp_units` as sharding units) and
    checkpoints are written shard by shard (torch.distributed.checkpoint)."""


@dataclass(kw_only=True)
class PreemptionConfig:
    check_every_steps: int = 10
    """Several processes agree on a stop signal every this many steps (an all-reduce + host sync); one: every step."""
    requeue: bool = True
    """Under SLURM, requeue the job (scontrol requeue) after saving on a stop signal, so it resumes by itself."""
    max_requeues: int = 10
    """Requeue one SLURM job at most this many times (counted in <run>/requeues.jsonl); then only save and stop."""


@dataclass(kw_only=True)
class EarlyStoppingConfig:
    patience: int = 0
    """Stop when the key metric has not improved by more than min_delta for this many evaluations (0: off)."""
    min_delta: float = 0.0
    """Smallest change of the key metric (in its mode's direction) that counts as an improvement."""


@dataclass(kw_only=True)
class EMAConfig:
    decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay, e.g. 0.999 (0: off). It is evaluated
    beside the raw weights (eval/ema_*) and saved (ema.safetensors, and in checkpoints)."""
    warmup_steps: int = 100
    """Ramp the decay linearly from 0 over this many optimizer steps, so the average forgets the init quickly."""


@dataclass(kw_only=True)
class TrainConfig:
    output_dir: Path = Path("runs")
    """Directory that holds the run directories."""
    run_name: str | None = None
    """Run directory name under output_dir (default: <recipe>-<SLURM job id> on SLURM, else <recipe>-<time>)."""
    phase: Literal["train", "test", "predict"] = "train"
    """train; test: evaluate --weights on the evaluation set and print the metrics; predict: run the recipe's
    predict(model, cfg, run_dir) with --weights (write predictions, sample text). No training in either."""
    weights: Path | None = None
    """Weights to load before training (fine-tuning) or to test: safetensors or a torch.save state dict."""
    resume: str = "auto"
    """auto: newest valid checkpoint of the run directory, if any; none: start fresh; or a checkpoint path."""
    allow_resume_changes: bool = False
    """Resume even when settings that matter (model shape, optimizer, global batch) differ from the checkpoint."""
    seed: int = 0
    """Random seed (model init, data order, augmentation)."""
    deterministic: bool = False
    """Use deterministic algorithms (torch.use_deterministic_algorithms, cudnn flags); slower."""
    max_epochs: int = 10
    """Number of training epochs."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides max_epochs when set)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision through Accelerate (fp16 needs a GPU)."""
    compile: bool = False
    """torch.compile the model, after wrapping it in DDP (checkpoint keys stay clean)."""
    stop_on_nonfinite: bool = True
    """Stop when the training loss becomes NaN or infinite (checked at each logging step); off: only warn."""
    eval_every_epochs: int = 1
    """Evaluate every this many epochs (0: only at the end)."""
    eval_every_steps: int = 0
    """Also evaluate every this many optimizer steps (0: off)."""
    key_metric: str = "accuracy"
    """Evaluation metric that decides the best checkpoint, watched by early stopping and the plateau schedule: any
    metric of the recipe's task (classification: accuracy or loss; ema_NAME with EMA)."""
    key_metric_mode: Literal["max", "min"] = "max"
    """Whether a larger (max) or smaller (min) key metric is better."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (paths as strings, tuples as lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}; lists become tuples so they compare and hash."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build the dataclass `cls` from `to_dict` output, strictly: unknown or mistyped entries name themselves."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        guesses = [g[0] for u in unknown if (g := difflib.get_close_matches(u, names, n=1))]
        closest = f" (did you mean {' or '.join(map(repr, guesses))}?)" if guesses else ""
        raise UserError(f"{where}: unknown entries {unknown}{closest}; {cls.__name__} has {sorted(names)}")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a section (JSON object), got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except UserError:
                continue
        raise UserError(f"{where}: {value!r} is not a {tp}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise UserError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise UserError(f"{where}: expected {len(item_types)} items, got {len(value)}")
        return tuple(_coerce(t, v, where) for t, v in zip(item_types, value, strict=True))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a JSON object, got {value!r}")
        return dict(value)
    if tp is Path:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a path string, got {value!r}")
        return Path(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads `1e-3`, without a dot, as a string: take the number it spells.
        try:
            return float(value)
        except ValueError:
            raise UserError(f"{where}: expected a number, got {value!r}") from None
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise UserError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    if tp is Any:
        return value
    raise UserError(f"{where}: cannot read a value of type {tp} from a config file")


def save_json(cfg: Any, path: Path) -> None:
    path.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
