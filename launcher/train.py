"""The training loop: `accelerate launch -m launcher.train RECIPE [--field.name value ...]`.

Setup, resume, train, evaluate, save, in that order. Accelerate owns devices, DDP and mixed precision; the
recipe owns the model and the data; everything else is this file and its small helpers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, parse_flag_from_env, set_seed
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from launcher import checkpoint as ckpt
from launcher import preemption
from launcher.config import OptimConfig, TrainConfig, to_dict
from launcher.data import DeviceTransform, EvalData, Source, TrainData, TrainPlan
from launcher.ema import EMA
from launcher.errors import TrainingDiverged, UserError
from launcher.evaluate import confusion_figure, evaluate, per_class_table
from launcher.model_stats import forward_flops, human, parameter_count
from launcher.ranks import PeerFailed, agreed
from launcher.recipe import Recipe, load_recipe, parse_config
from launcher.run_dir import (
    MetricsLog,
    close_log_file,
    default_run_name,
    record_error,
    setup_console,
    write_provenance,
)
from launcher.schedules import Plateau, make_scheduler, reapply, run_length, schedule_steps
from launcher.state_dict import load_into, read_weights, strip_prefixes

log = logging.getLogger("launcher")


def build_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adam":
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def _process_state() -> PartialState:
    """Accelerate's process state. ACCELERATE_USE_CPU (`accelerate launch --cpu`, or with --multi_gpu for gloo DDP
    on CPU) must be honoured here too: Accelerator reads it, but a PartialState created first would not."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


_UNSUPPORTED_BACKENDS = {
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}


def _check_launch(state: PartialState) -> None:
    """Refuse launches that would not train what they seem to: processes that do not form one group (plain
    `torchrun` on CPU without ACCELERATE_USE_CPU: every process trains alone as rank 0, into the same run
    directory), and backends this loop does not drive (it bypasses Accelerate's backward and optimizer wrappers
    and saves a rank-0 state_dict, which under FSDP or DeepSpeed would hang or save a shard)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > state.num_processes:
        raise UserError(
            f"{launched} processes were started (WORLD_SIZE={launched}) but they do not form one process group, "
            "so each would train alone as rank 0 into the same run directory; on CPU, launch with "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m launcher.train ..."
        )
    chosen = [name for flag, name in _UNSUPPORTED_BACKENDS.items() if parse_flag_from_env(flag)]
    if chosen or state.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        name = chosen[0] if chosen else state.distributed_type.value
        raise UserError(
            f"the accelerate configuration selects {name}, which this launcher does not drive yet: it trains on "
            "one device or with DDP. Launch with `accelerate launch --multi_gpu --num_processes N` and a config "
            "whose distributed_type is MULTI_GPU (run `accelerate config`, or pass --config_file)"
        )


def _run_dir(cfg: TrainConfig, recipe: Recipe) -> Path:
    """The run directory, named once on the main process and shared (a timestamp differs between ranks)."""
    name = [cfg.run_name or default_run_name(recipe.name + ("-test" if cfg.phase == "test" else ""))]
    if _process_state().num_processes > 1:
        broadcast_object_list(name)
    return cfg.output_dir / name[0]


def _open_run_dir(cfg: TrainConfig, recipe: Recipe, run_dir: Path, world: int) -> bool:
    """Create (or reuse) the run directory and write the provenance files; True if this start created it.
    An output directory that is a file, read-only or immutable is a one-line error, not a traceback."""
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_provenance(run_dir, cfg, world, recipe.path)
    except OSError as exc:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise UserError(
            f"cannot write the run directory {run_dir} ({exc.strerror or exc}); pass a writable --output-dir "
            f"(now {cfg.output_dir}) or free disk space"
        ) from None
    return created


def _make_accelerator(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard" if cfg.logging.tensorboard else None,
        project_dir=run_dir,
        # Accelerate compiles in `prepare`, after wrapping the model in DDP, so that compiled graphs break at
        # DDP's bucket boundaries and overlap its all-reduces (DDPOptimizer); compiling first would hide the
        # buckets from dynamo. None leaves it to the accelerate config (ACCELERATE_DYNAMO_BACKEND).
        dynamo_backend="inductor" if cfg.compile else None,
    )
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        log.warning(
            "WARNING: --mixed-precision fp16 needs a GPU. On CPU, Accelerate turns fp16 off and this run trains "
            "in fp32. Use --mixed-precision bf16 for reduced precision on CPU."
        )
    return accelerator


def _seed(cfg: TrainConfig) -> None:
    set_seed(cfg.seed)
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not cfg.deterministic
    torch.backends.cudnn.deterministic = cfg.deterministic
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    """<run>/NAME.safetensors with clean keys (main process; the run directory's config.json gives the mode)."""
    ckpt.write_weights(strip_prefixes(model.state_dict()), path, like=path.parent / "config.json")


def _resume_hint(cfg: TrainConfig, run_dir: Path) -> str:
    """How to resume this run: the same command finds its directory again only if its name does not change,
    which a default name does outside SLURM (it holds the start time; under SLURM it is the job id)."""
    if cfg.run_name is None and not os.environ.get("SLURM_JOB_ID"):
        return f"rerun the same command with --run-name {run_dir.name} to resume"
    return "rerun the same command to resume"


def run(cfg: TrainConfig, recipe: Recipe) -> dict[str, Any]:
    """Train (or test) one recipe configuration; returns the final evaluation metrics."""
    state = _process_state()
    _check_launch(state)
    run_dir = _run_dir(cfg, recipe)
    created = agreed(lambda: _open_run_dir(cfg, recipe, run_dir, state.num_processes), main_only=True)
    setup_console(run_dir, state.is_main_process)
    accelerator, mlog, started = None, None, False
    try:
        accelerator = _make_accelerator(cfg, run_dir)
        if cfg.phase == "test":
            return _test(cfg, recipe, accelerator, run_dir)
        mlog = MetricsLog(run_dir / "metrics.jsonl" if accelerator.is_main_process else None)
        s = _setup(cfg, recipe, accelerator, run_dir, mlog)
        started = True
        return _train(cfg, s, accelerator, run_dir, mlog)
    except UserError as exc:
        # A start that failed before training leaves no run directory behind if it made one; otherwise (a failed
        # resume, a failure while training) the error is in the run's train.log too.
        if state.is_main_process and created and not started:
            close_log_file()
            shutil.rmtree(run_dir, ignore_errors=True)
        elif state.is_main_process:
            record_error(
                "another process failed (its error is on the console)"
                if isinstance(exc, PeerFailed)
                else str(exc)
            )
        raise
    finally:
        preemption.uninstall()
        if mlog is not None:
            mlog.close()
        _end(accelerator)


def _end(accelerator: Accelerator | None) -> None:
    if accelerator is not None:
        accelerator.end_training()
    # Let another run start in this process (tests, sweeps) with a different configuration.
    AcceleratorState._reset_state(reset_partial_state=False)


def _eval_data(cfg: TrainConfig, dataset: Any, accelerator: Accelerator) -> EvalData:
    source = Source(dataset, cfg.data.in_memory, accelerator.device, cfg.data.num_workers)
    transform = DeviceTransform(cfg.data, cfg.seed, accelerator.device)
    return EvalData(
        source, cfg.data.eval_batch_size, accelerator.num_processes, accelerator.process_index, transform
    )


def _test(cfg: TrainConfig, recipe: Recipe, accelerator: Accelerator, run_dir: Path) -> dict[str, Any]:
    _seed(cfg)
    assert cfg.weights is not None

    def build() -> tuple[torch.nn.Module, Any, EvalData]:
        model = recipe.make_model(cfg)
        load_into(model, read_weights(cfg.weights), source=str(cfg.weights))
        dataset = recipe.make_datasets(cfg).eval
        return model, dataset, _eval_data(cfg, dataset, accelerator)

    model, dataset, eval_data = agreed(build)
    model = accelerator.prepare_model(model, evaluation_mode=True)
    metrics, confusion = evaluate(
        accelerator.unwrap_model(model, keep_torch_compile=False), eval_data, accelerator
    )
    names = getattr(dataset, "classes", None)
    log.info(
        "test  %s: loss %.4f  accuracy %.4f  (%d samples)\n%s",
        cfg.weights,
        metrics["loss"],
        metrics["accuracy"],
        metrics["samples"],
        per_class_table(confusion, names),
    )
    metrics_log = MetricsLog(run_dir / "metrics.jsonl" if accelerator.is_main_process else None)
    per_class = (confusion.diagonal() / confusion.sum(1).clamp(min=1)).tolist()
    metrics_log.write(
        "test",
        0,
        0.0,
        {
            "weights": str(cfg.weights),
            **metrics,
            "per_class_accuracy": per_class,
            "confusion": confusion.tolist(),
        },
    )
    metrics_log.close()
    if accelerator.is_main_process and cfg.logging.tensorboard:
        accelerator.init_trackers("tensorboard")
        accelerator.log({f"test/{k}": v for k, v in metrics.items() if k != "samples"}, step=0)
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_figure("test/confusion_matrix", confusion_figure(confusion, names), global_step=0)
        writer.flush()
    return metrics


@dataclass
class _Setup:
    """Everything the loop works with, built (and resumed) by `_setup`."""

    model: Any  # prepared by Accelerate (DDP-wrapped under several processes, then compiled with --compile)
    plain: torch.nn.Module  # the recipe's module itself: evaluation, best weights, EMA
    optimizer: Any
    scheduler: LambdaLR
    plateau: Plateau | None
    ema: EMA | None
    plan: TrainPlan
    train_data: TrainData
    eval_data: EvalData
    steps_per_epoch: int
    total_steps: int
    checkpointer: ckpt.Checkpointer
    state: ckpt.TrainState
    meta: dict  # what every checkpoint records besides the tensors: fingerprint and config


def _build(cfg: TrainConfig, recipe: Recipe, accelerator: Accelerator) -> tuple[Any, TrainData, EvalData]:
    """The recipe's model and data. Every rank builds them from the same seed, so that a recipe that splits or
    shuffles with the global RNG gets the same split on every rank; the ranks' RNGs part only afterwards."""
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    _seed(cfg)
    model = recipe.make_model(cfg)
    if cfg.weights is not None:
        load_into(model, read_weights(cfg.weights), source=str(cfg.weights))
    datasets = recipe.make_datasets(cfg)
    plan = TrainPlan(len(datasets.train), cfg.data.batch_size, world, rank, cfg.data.drop_last)
    if plan.batches_per_epoch == 0:
        raise UserError(
            f"the training set ({plan.num_samples} samples) is smaller than one global batch "
            f"({plan.global_batch}); lower --data.batch-size"
        )
    source = Source(datasets.train, cfg.data.in_memory, device, cfg.data.num_workers)
    train_data = TrainData(
        source, plan, DeviceTransform(cfg.data, cfg.seed, device), cfg.seed, cfg.data.shuffle
    )
    return model, train_data, _eval_data(cfg, datasets.eval, accelerator)


def _setup(
    cfg: TrainConfig, recipe: Recipe, accelerator: Accelerator, run_dir: Path, mlog: MetricsLog
) -> _Setup:
    world, device = accelerator.num_processes, accelerator.device
    model, train_data, eval_data = agreed(lambda: _build(cfg, recipe, accelerator))
    set_seed(cfg.seed, device_specific=True)  # dropout & co. differ between ranks; the init above did not
    plan = train_data.plan
    steps_per_epoch, total_steps = run_length(
        len(train_data), cfg.grad_accum_steps, cfg.max_epochs, cfg.max_steps
    )
    global_batch = plan.global_batch * cfg.grad_accum_steps
    log.info(
        "run %s | %d process(es) on %s | global batch %d = %d per device x %d processes x %d accumulation | "
        "%d optimizer steps per epoch, %d in total",
        run_dir, world, device.type, global_batch, cfg.data.batch_size, world, cfg.grad_accum_steps,
        steps_per_epoch, total_steps,
    )  # fmt: skip

    optimizer = build_optimizer(model.parameters(), cfg.optim)
    fingerprint = {
        "model": ckpt.model_fingerprint(model),
        "optimizer": cfg.optim.name,
        "global_batch": global_batch,
        "train_samples": plan.num_samples,
    }
    model, optimizer = accelerator.prepare(model, optimizer)
    plain_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    parameters, trainable = parameter_count(plain_model)
    flops = forward_flops(plain_model, eval_data.first())
    log.info(
        "model: %s parameters (%s trainable), %s forward FLOPs per sample",
        human(parameters), human(trainable), human(flops),
    )  # fmt: skip

    checkpointer = ckpt.Checkpointer(
        run_dir,
        accelerator,
        cfg.checkpoint.keep_last,
        cfg.checkpoint.tolerate_save_failures,
        async_save=cfg.checkpoint.async_save,
    )
    # The main process alone picks and verifies the checkpoint and checks what changed; every rank loads it.
    resumed_from, record = agreed(
        lambda: _choose_checkpoint(cfg, checkpointer, fingerprint, plan), main_only=True
    )
    state = ckpt.TrainState()
    if resumed_from is not None:
        state = _load_checkpoint(resumed_from, record, cfg, model, optimizer, accelerator, plan)
    # Built after the resume, from the resumed weights: an EMA switched on in a resumed run averages from there.
    ema = EMA(plain_model, cfg.ema.decay, cfg.ema.warmup_steps) if cfg.ema.decay > 0 else None
    if ema is not None and resumed_from is not None:
        ckpt.load_ema(resumed_from, ema)
    plateau = None
    if cfg.schedule.decay == "plateau":
        watch_loss = cfg.schedule.plateau_metric == "loss"
        plateau = Plateau(cfg.schedule, mode="min" if watch_loss else cfg.key_metric_mode)
        if state.plateau is not None:
            plateau.load_state_dict(state.plateau)
    steps = schedule_steps(cfg.schedule, steps_per_epoch, total_steps)
    scheduler = make_scheduler(
        optimizer.optimizer, steps, cfg.schedule, last_step=state.step, plateau=plateau
    )

    mlog.write("setup", state.step, state.epoch, {
        "processes": world, "per_device_batch": cfg.data.batch_size, "grad_accum_steps": cfg.grad_accum_steps,
        "global_batch": global_batch, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
        "mixed_precision": "no" if cfg.mixed_precision == "fp16" and device.type == "cpu" else cfg.mixed_precision,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "parameters": parameters, "flops_per_sample": flops,
    })  # fmt: skip
    meta = {"fingerprint": fingerprint, "config": to_dict(cfg)}
    return _Setup(model, plain_model, optimizer, scheduler, plateau, ema, plan, train_data, eval_data,
                  steps_per_epoch, total_steps, checkpointer, state, meta)  # fmt: skip


def _format(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


class _Evaluator:
    """Evaluation with its bookkeeping: best weights, early stopping, the plateau schedule, logs."""

    def __init__(
        self, cfg: TrainConfig, s: _Setup, accelerator: Accelerator, run_dir: Path, mlog: MetricsLog
    ):
        self.cfg, self.s, self.accelerator, self.mlog = cfg, s, accelerator, mlog
        self.best_path = run_dir / "best.safetensors"
        self.sign = 1.0 if cfg.key_metric_mode == "max" else -1.0
        self.last: dict[str, Any] = {}
        self.step = -1  # step of the last evaluation
        self.stop = False  # early stopping triggered

    def __call__(self) -> None:
        cfg, s, state, acc = self.cfg, self.s, self.s.state, self.accelerator
        if self.step == state.step:
            return
        self.last, _ = evaluate(s.plain, s.eval_data, acc)
        if s.ema is not None:
            ema_eval, _ = evaluate(s.ema.model, s.eval_data, acc)
            self.last |= {f"ema_{k}": v for k, v in ema_eval.items() if k != "samples"}
        self.step = state.step
        epoch = state.epoch + state.samples_in_epoch / s.plan.num_samples
        value, previous_best = self.last[cfg.key_metric], state.best_value
        # NaN compares false with everything, so without the finiteness test a diverged run's NaN would be
        # "better" than nothing and its weights would become best.safetensors. A non-finite loss disqualifies
        # whatever the key metric: weights that give NaN logits still score an accuracy (of the argmax of NaN).
        finite = math.isfinite(value) and math.isfinite(self.last["loss"])
        improved = finite and (previous_best is None or self.sign * value > self.sign * previous_best)
        if improved:
            state.best_value, state.best_step = value, state.step
            if acc.is_main_process:
                from_ema = s.ema is not None and cfg.key_metric.startswith("ema_")
                _save_weights(s.ema.model if from_ema else s.plain, self.best_path)
        elif not finite:
            log.warning("WARNING: a non-finite evaluation at step %d does not count as the best", state.step)
        self.mlog.write("eval", state.step, epoch, {**self.last, "best_" + cfg.key_metric: state.best_value})
        acc.log({f"eval/{k}": v for k, v in self.last.items() if k != "samples"}, step=state.step)
        shown = "  ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in self.last.items() if k != "samples")
        log.info("eval  step %d epoch %.2f: %s%s", state.step, epoch, shown, "  (best)" if improved else "")
        if cfg.early_stopping.patience:
            gain = math.inf if previous_best is None else self.sign * (value - previous_best)
            state.stale_evals = 0 if gain > cfg.early_stopping.min_delta else state.stale_evals + 1
            if state.stale_evals >= cfg.early_stopping.patience:
                self.stop = True
                log.info(
                    "early stopping at step %d: %s has not improved by more than %g for %d evaluations "
                    "(best %s at step %s)",
                    state.step, cfg.key_metric, cfg.early_stopping.min_delta, state.stale_evals,
                    _format(state.best_value), state.best_step,
                )  # fmt: skip
                self.mlog.write("early_stop", state.step, epoch, {"stale_evals": state.stale_evals})
        if s.plateau is not None:
            before = s.plateau.scale
            s.plateau.step(self.last["loss"] if cfg.schedule.plateau_metric == "loss" else value)
            state.plateau = s.plateau.state_dict()
            if s.plateau.scale != before:
                # The next update (index state.step) already has its lr; a cut must apply to it, as it does
                # when a run resumed from this step's checkpoint builds its scheduler.
                reapply(s.scheduler)
                log.info(
                    "plateau: lr multiplier %.3g -> %.3g at step %d", before, s.plateau.scale, state.step
                )


class _TrainLog:
    """The training metrics of one logging interval: summed on the device, read back once at its end.

    Step convention (TensorBoard and metrics.jsonl alike): a value logged at step N belongs to the N-th optimizer
    update, the one that brought the step count to N; `train/lr` at N is the lr that update used, and
    `train/loss` at N the mean loss of the updates since the previous logging step, up to and including N."""

    def __init__(self, cfg: TrainConfig, s: _Setup, accelerator: Accelerator, mlog: MetricsLog):
        self.cfg, self.s, self.accelerator, self.mlog = cfg, s, accelerator, mlog
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.grad_norm: torch.Tensor | None = None
        self.lrs: list[tuple[int, float]] = []  # (step, lr) of every update of the interval
        self.skipped = 0  # updates the fp16 grad scaler skipped (inf/NaN gradients) in this interval
        tensorboard = accelerator.is_main_process and cfg.logging.tensorboard
        self.writer = accelerator.get_tracker("tensorboard", unwrap=True) if tensorboard else None
        self.paused = 0.0  # seconds spent evaluating and saving, left out of samples/s
        self.bar = tqdm(
            total=s.total_steps, initial=s.state.step, dynamic_ncols=True, desc="train",
            disable=not (accelerator.is_main_process and cfg.logging.progress_bar),
        )  # fmt: skip
        self._mark()

    def _mark(self, now: float | None = None) -> None:
        self.start_step, self.start_samples = self.s.state.step, self.s.state.samples_seen
        self.start_time, self.paused = time.perf_counter() if now is None else now, 0.0

    def flush(self) -> None:
        """Log the interval: the only host sync of the hot path. A non-finite loss stops the run here (unless
        --no-stop-on-nonfinite), before anything of this step is evaluated or saved."""
        state, acc, first = self.s.state, self.accelerator, self.start_step
        if state.samples_seen == self.start_samples:  # nothing trained since the last flush
            return
        now = time.perf_counter()
        samples = state.samples_seen - self.start_samples
        loss = acc.reduce(self.loss_sum, "sum").item() / max(1, samples)
        values = {"train/loss": loss, "train/samples_per_s": samples / (now - self.start_time - self.paused)}
        if self.grad_norm is not None:
            values["train/grad_norm"] = self.grad_norm.item()
        epoch = state.epoch + state.samples_in_epoch / self.s.plan.num_samples
        record = {k[6:]: v for k, v in values.items()}
        if self.lrs:
            record["lr"] = self.lrs[-1][1]
        if self.skipped:
            record["skipped_steps"] = self.skipped
            log.warning("WARNING: the fp16 grad scaler skipped %d update(s) (inf/NaN gradients) before step %d",
                        self.skipped, state.step)  # fmt: skip
        self.mlog.write("train", state.step, epoch, record)
        if self.writer is not None:
            # Straight into the tracker's SummaryWriter: accelerator.log flushes the file on every call, which
            # would cost ~80 us for each step's lr instead of ~28.
            for step, lr in self.lrs if self.cfg.logging.lr_every_step else self.lrs[-1:]:
                self.writer.add_scalar("train/lr", lr, step)
        acc.log(values, step=state.step)
        self.bar.update(state.step - self.start_step)
        shown_lr = f"{self.lrs[-1][1]:.3g}" if self.lrs else "-"
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=shown_lr, sps=f"{values['train/samples_per_s']:.0f}")
        self.loss_sum.zero_()
        self.lrs.clear()
        self.skipped = 0
        self._mark(now)  # the time spent logging counts towards the next interval
        if not math.isfinite(loss):
            self._nonfinite(loss, epoch, first)

    def _nonfinite(self, loss: float, epoch: float, first: int) -> None:
        state = self.s.state
        message = (
            f"training diverged: the training loss is {loss} at step {state.step} (mean since step {first})"
        )
        self.mlog.write("diverged", state.step, epoch, {"loss": loss})
        if not self.cfg.stop_on_nonfinite:
            log.warning("WARNING: %s; training goes on (--no-stop-on-nonfinite)", message)
            return
        if not self.accelerator.is_main_process:
            raise PeerFailed(message)
        raise TrainingDiverged(
            f"{message}. Nothing of this step was saved; checkpoints after step {first} may "
            f"hold non-finite weights. Lower --optim.lr (now {self.cfg.optim.lr:g}), clip with "
            "--optim.grad-clip-norm, or pass --no-stop-on-nonfinite to train on"
        )

    def timed(self, fn: Any) -> None:
        """Run `fn` (an evaluation or a save) with its time left out of samples/s."""
        start = time.perf_counter()
        fn()
        self.paused += time.perf_counter() - start


def _due(happened: bool, count: int, every: int) -> bool:
    return happened and every > 0 and count % every == 0


def _train(
    cfg: TrainConfig, s: _Setup, accelerator: Accelerator, run_dir: Path, mlog: MetricsLog
) -> dict[str, Any]:
    model, optimizer, plan, state = s.model, s.optimizer, s.plan, s.state
    if accelerator.is_main_process and cfg.logging.tensorboard:
        accelerator.init_trackers("tensorboard")
    evaluator = _Evaluator(cfg, s, accelerator, run_dir, mlog)
    train_log = _TrainLog(cfg, s, accelerator, mlog)
    saved_step = state.step

    def save() -> None:
        nonlocal saved_step
        if saved_step == state.step and s.checkpointer.list():
            return
        saved_step, start = state.step, time.perf_counter()
        if s.checkpointer.save(model, optimizer, accelerator.scaler, state, s.meta, ema=s.ema):
            blocked = time.perf_counter() - start
            if cfg.checkpoint.async_save:  # the checkpointer logs the commit itself
                log.info("checkpoint step %d: writing in the background (blocked %.2fs)", state.step, blocked)
            else:
                log.info("saved checkpoint step %d (%.2fs)", state.step, blocked)

    accum, world, micro_per_epoch = cfg.grad_accum_steps, accelerator.num_processes, len(s.train_data)
    # Accelerate's optimizer wrapper only forwards step() and zero_grad() unless a grad scaler (fp16) is in use,
    # and doing so costs ~100 us per step on CPU (two is_lomo_available() import lookups and an inspect.signature
    # per call; benchmarks/loop_overhead.py): without a scaler, step the wrapped optimizer itself.
    stepper = optimizer if accelerator.scaler is not None else optimizer.optimizer
    # For the same reason, backward: accelerator.backward adds a division by its accumulation steps (always 1:
    # the loop scales losses itself) to what a scaler needs. The scale enters as backward's incoming gradient,
    # one cached tensor per distinct value, instead of a multiplication and its autograd node per step.
    backward = accelerator.backward if accelerator.scaler is not None else torch.Tensor.backward
    scales: dict[float, torch.Tensor] = {}

    def loss_scale(value: float) -> torch.Tensor:
        if value not in scales:
            scales[value] = torch.tensor(value, device=accelerator.device)
        return scales[value]

    def finished() -> bool:
        # --max-steps counts optimizer updates; --max-epochs counts epochs (the same end unless fp16 skips steps).
        if evaluator.stop:
            return True
        return state.step >= s.total_steps if cfg.max_steps is not None else state.epoch >= cfg.max_epochs

    preemption.install()
    stopped_by_signal = False
    model.train()
    while not finished() and not stopped_by_signal:
        epoch, b = state.epoch, state.samples_in_epoch // plan.global_batch
        for images, labels in s.train_data.epoch(epoch, b):
            window_start = b - b % accum
            window_end = min(window_start + accum, micro_per_epoch)
            sync = b + 1 == window_end
            # Normalise by the samples of the whole window on all processes, times the process count that
            # DDP's averaging divides by: the gradient is the mean over the global batch, also for the shorter
            # last window of an epoch. Non-final micro-batches skip DDP's all-reduce (no_sync).
            window_samples = sum(plan.global_count(i) for i in range(window_start, window_end))
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss = F.cross_entropy(model(images), labels, reduction="sum")
                backward(loss, gradient=loss_scale(world / window_samples))
            train_log.loss_sum += loss.detach()
            b += 1
            if not sync:
                continue
            lr = stepper.param_groups[0]["lr"]
            if cfg.optim.grad_clip_norm > 0:
                train_log.grad_norm = accelerator.clip_grad_norm_(
                    model.parameters(), cfg.optim.grad_clip_norm
                )
            stepped = optimizer_step(stepper)
            # The position first, then everything that reads it: an evaluation or a checkpoint of the epoch's
            # last step must see the epoch as finished.
            state.samples_seen += window_samples
            epoch_end = b == micro_per_epoch
            state.epoch, state.samples_in_epoch = (
                (epoch + 1, 0) if epoch_end else (epoch, b * plan.global_batch)
            )
            if stepped:
                if s.ema is not None:
                    s.ema.update(state.step)
                s.scheduler.step()
                state.step += 1
                train_log.lrs.append((state.step, lr))
            else:
                train_log.skipped += 1

            if stepped and (state.step % cfg.logging.every_steps == 0 or state.step == s.total_steps):
                train_log.flush()
            if _due(stepped, state.step, cfg.eval_every_steps) or _due(
                epoch_end, state.epoch, cfg.eval_every_epochs
            ):
                train_log.timed(evaluator)
            if _due(stepped, state.step, cfg.checkpoint.every_steps) or _due(
                epoch_end, state.epoch, cfg.checkpoint.every_epochs
            ):
                train_log.timed(save)
            if stepped and preemption.stop_agreed(accelerator, state.step, cfg.preemption.check_every_steps):
                stopped_by_signal = True
                break
            if finished():
                break
    train_log.flush()  # the steps since the last logging step (a signal or early stopping came in between)
    train_log.bar.close()

    if stopped_by_signal:
        save()
        s.checkpointer.wait()  # the requeued job must find this checkpoint committed
        signal_name = preemption.received() or "a signal to another process"
        log.info(
            "stopped by %s at step %d after saving; %s", signal_name, state.step, _resume_hint(cfg, run_dir)
        )
        preemption.requeue_after_save(accelerator, run_dir, state.step, cfg.preemption)
        return {"preempted": True, "signal": signal_name, "step": state.step, "run_dir": str(run_dir)}

    evaluator()
    save()
    s.checkpointer.wait()
    if s.ema is not None and accelerator.is_main_process:
        _save_weights(s.ema.model, run_dir / "ema.safetensors")
    epoch = state.epoch + state.samples_in_epoch / plan.num_samples
    final = {**evaluator.last, "best_" + cfg.key_metric: state.best_value, "best_step": state.best_step}
    mlog.write("final", state.step, epoch, final)
    log.info(
        "done: step %d, final %s %.4f, best %s at step %s; run directory %s",
        state.step, cfg.key_metric, evaluator.last[cfg.key_metric], _format(state.best_value), state.best_step,
        run_dir,
    )  # fmt: skip
    return {**evaluator.last, "best": state.best_value, "step": state.step, "run_dir": str(run_dir)}


def optimizer_step(stepper: Any) -> bool:
    """Step and zero the gradients; False when the fp16 grad scaler skipped the update (inf/NaN gradients), which
    then must not advance the schedule, the EMA or the step count. `stepper` is Accelerate's optimizer wrapper
    when a scaler is in use (its step_was_skipped says so), else the plain optimizer, which never skips."""
    stepper.step()
    stepper.zero_grad(set_to_none=True)
    return not getattr(stepper, "step_was_skipped", False)


# ---- resume --------------------------------------------------------------------------------------------------
# How a resume treats a setting that differs from the checkpoint's run (torchtune's field-by-field policy):
# fields under these prefixes are applied from the resumed step on, each named in a warning; `seed` mid-epoch and
# the key metric are refused unless --allow-resume-changes (the data order would change halfway through an epoch;
# the best so far was measured in another metric); the model, optimizer and global batch are the fingerprint's.
_APPLIED = ("optim.", "schedule.", "ema.", "early_stopping.", "max_epochs", "max_steps")
_KEY_METRIC = ("key_metric", "key_metric_mode")


def _flat(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _changes(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Settings of this run that differ from the checkpoint's run: {dotted name: (old, new)}."""
    old, new = dict(_flat(saved)), dict(_flat(to_dict(cfg)))
    return {k: (old.get(k), new[k]) for k in new if k in old and old[k] != new[k]}


def _choose_checkpoint(
    cfg: TrainConfig, checkpointer: ckpt.Checkpointer, fingerprint: dict, plan: TrainPlan
) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its verified state.json, after checking that it fits this run."""
    path = ckpt.resolve_resume(cfg.resume, checkpointer)
    if path is None:
        return None, None
    record = ckpt.verify(path)
    problems = ckpt.check_compatible(record, fingerprint, path)
    saved_state = record["state"]
    position = _normalised(saved_state, plan)["samples_in_epoch"]
    changes = _changes(record["config"], cfg)
    if "seed" in changes and position:
        problems.append(f"seed {changes['seed'][0]} -> {changes['seed'][1]} in the middle of an epoch (the data "
                        "order of the rest of the epoch would change)")  # fmt: skip
    for key in _KEY_METRIC:
        if key in changes:
            old, new = changes[key]
            problems.append(f"{key} {old} -> {new} (the best so far was measured by the old one)")
    if problems and not cfg.allow_resume_changes:
        raise UserError(
            f"cannot resume from {path}: this run differs in what it trains:\n  "
            + "\n  ".join(problems)
            + "\nStart a new run (--run-name NEW or --resume none), or pass --allow-resume-changes"
        )
    for problem in problems:
        log.warning("WARNING: resuming despite a change (--allow-resume-changes): %s", problem)
    applied = [
        f"{k} {old} -> {new}"
        for k, (old, new) in changes.items()
        if k.startswith(_APPLIED) and k != "optim.name"
    ]
    if applied:
        log.warning(
            "WARNING: resuming with changed settings, applied from step %d on: %s",
            saved_state["step"],
            "; ".join(applied),
        )
    if position % plan.global_batch:
        raise UserError(
            f"the checkpoint stopped {position} samples into an epoch, not a multiple of "
            f"this run's global micro-batch {plan.global_batch}; keep --data.batch-size x processes"
        )
    return path, record


def _normalised(saved: dict[str, Any], plan: TrainPlan) -> dict[str, Any]:
    """The saved position with a finished epoch counted as finished: checkpoints written before the epoch
    bookkeeping moved ahead of the saves recorded the last step of an epoch as `samples_in_epoch == num_samples`."""
    if saved["samples_in_epoch"] >= plan.num_samples:
        return {**saved, "epoch": saved["epoch"] + 1, "samples_in_epoch": 0}
    return saved


def _load_checkpoint(
    path: Path,
    record: dict,
    cfg: TrainConfig,
    model: Any,
    optimizer: Any,
    accelerator: Accelerator,
    plan: TrainPlan,
) -> ckpt.TrainState:
    ckpt.load(path, model, optimizer, accelerator.scaler, accelerator, record)
    # The optimizer's hyperparameters are this run's, not the checkpoint's: a changed lr, momentum, weight decay
    # or betas takes effect (the loaded param_groups would otherwise win, silently). `initial_lr` is the peak the
    # schedule multiplies.
    fresh = build_optimizer([torch.zeros(1, requires_grad=True)], cfg.optim).param_groups[0]
    for group in optimizer.param_groups:
        group.update({k: v for k, v in fresh.items() if k != "params"}, initial_lr=cfg.optim.lr)
    state = ckpt.TrainState(**_normalised(record["state"], plan))
    if any(k in _changes(record["config"], cfg) for k in _KEY_METRIC):  # allowed, so the best starts over
        state.best_value = state.best_step = None
        state.stale_evals = 0
    if record["world_size"] != accelerator.num_processes:
        log.warning(
            "resuming a %d-process checkpoint on %d processes: the data position maps by samples seen "
            "(%d into epoch %d)",
            record["world_size"],
            accelerator.num_processes,
            state.samples_in_epoch,
            state.epoch,
        )
    log.info(
        "resumed from %s at step %d (epoch %d, %d samples into it)",
        path,
        state.step,
        state.epoch,
        state.samples_in_epoch,
    )
    return state


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "launcher.train RECIPE"
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        if not argv or argv[0].startswith("-"):
            from launcher.recipe import available_recipes

            recipes = "\n".join(f"  {p}" for p in available_recipes())
            print(
                f"usage: {prog} [--field.name VALUE ...]\n\nThe first argument is a recipe file:\n{recipes}\n"
                f"Run `{prog} --help` with a recipe to see its fields."
            )
            return 0 if argv and argv[0] in ("-h", "--help") else 2
        recipe = load_recipe(argv[0])
        cfg = parse_config(recipe, argv[1:], prog=f"launcher.train {argv[0]}")
    except UserError as exc:
        if rank == 0:  # the same recipe and flags on every rank: the same error; say it once
            print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = run(cfg, recipe)
    except PeerFailed:
        return 2  # the rank that failed said why
    except UserError as exc:
        # Only the ranks that failed get here, each saying so: a data path missing on one node names that rank.
        print(f"{f'[rank {rank}] ' if world > 1 else ''}error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (during setup, or a second one)
        print("interrupted", file=sys.stderr)
        return preemption.EXIT_INTERRUPTED
    if result.get("signal") == "SIGINT":
        return preemption.EXIT_INTERRUPTED
    return preemption.EXIT_PREEMPTED if result.get("preempted") else 0


if __name__ == "__main__":
    sys.exit(main())
