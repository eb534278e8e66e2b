"""The training loop: `accelerate launch -m launcher.train RECIPE [--field.name value ...]`.

Setup, resume, train, evaluate, save, in that order. Accelerate owns devices, DDP and mixed precision; the
recipe owns the model and the data; everything else is this file and its small helpers.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, parse_flag_from_env, set_seed
from torch.optim.lr_scheduler import LambdaLR

from launcher import checkpoint as ckpt
from launcher import resume, trackers
from launcher.checkpoint.sharded import tied_names
from launcher.checkpoint.state_dict import load_into, strip_prefixes
from launcher.checkpoint.weights import read_weights, write_weights
from launcher.cluster import preemption
from launcher.config import OptimConfig, TrainConfig, to_dict
from launcher.data import DeviceTransform, EvalData, Source, TrainData, TrainPlan
from launcher.ema import EMA
from launcher.errors import UserError
from launcher.evaluate import confusion_figure, evaluate, per_class_table
from launcher.model_stats import forward_flops, human, parameter_count
from launcher.optim import build_optimizer
from launcher.parallel import full_state_dict, gradient_sync, is_sharded, local_shard, shard
from launcher.progress import Clock, IntervalLog
from launcher.ranks import PeerFailed, agreed
from launcher.recipe import Recipe, config_yaml, load_recipe, parse_config
from launcher.run_dir import (
    MetricsLog,
    close_log_file,
    console,
    default_run_name,
    record_error,
    setup_console,
    write_provenance,
)
from launcher.schedules import Plateau, make_scheduler, reapply, run_length, schedule_steps
from launcher.task import Loss, Task
from launcher.throughput import peak_rss_bytes

log = logging.getLogger("launcher")


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
    and saves with its own checkpointer; Accelerate's FSDP plugin and DeepSpeed would shard behind its back).
    Sharding is --parallel.strategy fsdp, which applies FSDP2 itself (launcher.parallel)."""
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
            "one device, with DDP, or with its own FSDP (--parallel.strategy fsdp). Launch with `accelerate "
            "launch --multi_gpu --num_processes N` and a config whose distributed_type is MULTI_GPU (run "
            "`accelerate config`, or pass --config_file), adding --parallel.strategy fsdp to shard the model"
        )


def _run_dir(cfg: TrainConfig, recipe: Recipe) -> Path:
    """The run directory, named once on the main process and shared (a timestamp differs between ranks)."""
    name = [cfg.run_name or default_run_name(recipe.name + ("" if cfg.phase == "train" else f"-{cfg.phase}"))]
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


def _make_accelerator(cfg: TrainConfig, run_dir: Path, project: str = "launcher") -> Accelerator:
    # Trackers live on the main process only (the others would import wandb and mlflow for nothing).
    main = _process_state().is_main_process
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=(trackers.build(cfg, run_dir, project) or None) if main else None,
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


def _save_weights(model: torch.nn.Module, path: Path, is_main: bool) -> None:
    """<run>/NAME.safetensors with clean keys, written by the main process; every process calls it (a sharded
    model's weights are gathered from all of them)."""
    state = full_state_dict(model) if is_sharded(model) or is_main else {}
    if is_main:
        write_weights(strip_prefixes(state), path)


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
        accelerator = _make_accelerator(cfg, run_dir, recipe.name)
        if cfg.phase != "predict":
            trackers.start(accelerator, cfg, run_dir)
        if cfg.phase == "test":
            return _test(cfg, recipe, accelerator, run_dir)
        if cfg.phase == "predict":
            return _predict(cfg, recipe, accelerator, run_dir)
        mlog = MetricsLog(run_dir / "metrics.jsonl" if accelerator.is_main_process else None)
        training = _setup(cfg, recipe, accelerator, run_dir, mlog)
        started = True
        with console():
            return _train(training)
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
        training = None  # the model goes before the process group: see _end
        _end(accelerator)


def _end(accelerator: Accelerator | None) -> None:
    if accelerator is not None:
        # A DDP model's reducer holds the process group. Freed after end_training destroyed the group, it would
        # destroy the gloo group itself, holding the GIL, and with torch < 2.14 that can deadlock (gloo's thread
        # releases the last all-gather's tensors, which needs the GIL): free the models while the group lives.
        accelerator.free_memory()
        accelerator.end_training()
    # Let another run start in this process (tests, sweeps) with a different configuration.
    AcceleratorState._reset_state(reset_partial_state=False)


def _source(cfg: TrainConfig, dataset: Any, task: Task, accelerator: Accelerator) -> Source:
    data = cfg.data
    return Source(dataset, data.in_memory, accelerator.device, data.num_workers, task.images, task.collate_fn,
                  prefetch_factor=data.prefetch_factor)  # fmt: skip


def _transform(cfg: TrainConfig, task: Task, accelerator: Accelerator) -> DeviceTransform | None:
    """Image normalisation and augmentation on the device, for tasks on images (opt-in: `Task.images`)."""
    return DeviceTransform(cfg.data, cfg.seed, accelerator.device) if task.images else None


def _eval_data(cfg: TrainConfig, dataset: Any, task: Task, accelerator: Accelerator) -> EvalData:
    source = _source(cfg, dataset, task, accelerator)
    world, rank = accelerator.num_processes, accelerator.process_index
    return EvalData(source, cfg.data.eval_batch_size, world, rank, _transform(cfg, task, accelerator))


def _trained_model(cfg: TrainConfig, recipe: Recipe) -> torch.nn.Module:
    """The recipe's model with --weights loaded (the test and predict phases)."""
    assert cfg.weights is not None
    model = recipe.make_model(cfg)
    load_into(model, read_weights(cfg.weights), source=str(cfg.weights))
    return model


def _test(cfg: TrainConfig, recipe: Recipe, accelerator: Accelerator, run_dir: Path) -> dict[str, Any]:
    _seed(cfg)

    def build() -> tuple[torch.nn.Module, Task, Any, EvalData]:
        model, task = _trained_model(cfg, recipe), recipe.make_task(cfg)
        dataset = recipe.make_datasets(cfg).eval
        return model, task, dataset, _eval_data(cfg, dataset, task, accelerator)

    model, task, dataset, eval_data = agreed(build)
    model = accelerator.prepare_model(model, evaluation_mode=True)
    metrics, confusion = evaluate(
        accelerator.unwrap_model(model, keep_torch_compile=False), eval_data, accelerator, task
    )
    names = getattr(dataset, "classes", None)
    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "samples")
    table = "" if confusion is None else "\n" + per_class_table(confusion, names)
    log.info("test  %s: %s  (%d samples)%s", cfg.weights, shown, metrics["samples"], table)
    record: dict[str, Any] = {"weights": str(cfg.weights), **metrics}
    if confusion is not None:
        record["per_class_accuracy"] = (confusion.diagonal() / confusion.sum(1).clamp(min=1)).tolist()
        record["confusion"] = confusion.tolist()
    metrics_log = MetricsLog(run_dir / "metrics.jsonl" if accelerator.is_main_process else None)
    metrics_log.write("test", 0, 0.0, record)
    metrics_log.close()
    accelerator.log({f"test/{k}": v for k, v in metrics.items() if k != "samples"}, step=0)
    if accelerator.is_main_process and "tensorboard" in cfg.logging.trackers:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        if confusion is not None:
            writer.add_figure("test/confusion_matrix", confusion_figure(confusion, names), global_step=0)
        writer.flush()
    return metrics


def _predict(cfg: TrainConfig, recipe: Recipe, accelerator: Accelerator, run_dir: Path) -> dict[str, Any]:
    """The recipe's `predict(model, cfg, run_dir)` with --weights loaded, on the main process."""
    _seed(cfg)
    model = agreed(lambda: _trained_model(cfg, recipe))
    model = accelerator.unwrap_model(accelerator.prepare_model(model, evaluation_mode=True))
    result: dict[str, Any] = {}
    if accelerator.is_main_process:
        model.eval()
        with torch.no_grad(), accelerator.autocast():
            result = recipe.run_predict(model, cfg, run_dir)
    accelerator.wait_for_everyone()
    return result


def _build(
    cfg: TrainConfig, recipe: Recipe, accelerator: Accelerator
) -> tuple[Any, Task, TrainData, EvalData]:
    """The recipe's model, task and data. Every rank builds them from the same seed, so that a recipe that splits
    or shuffles with the global RNG gets the same split on every rank; the ranks' RNGs part only afterwards."""
    world, rank = accelerator.num_processes, accelerator.process_index
    _seed(cfg)
    model = recipe.make_model(cfg)
    if cfg.weights is not None:
        load_into(model, read_weights(cfg.weights), source=str(cfg.weights))
    task = recipe.make_task(cfg)
    datasets = recipe.make_datasets(cfg)
    plan = TrainPlan(len(datasets.train), cfg.data.batch_size, world, rank, cfg.data.drop_last)
    if plan.batches_per_epoch == 0:
        raise UserError(
            f"the training set ({plan.num_samples} samples) is smaller than one global batch "
            f"({plan.global_batch}); lower --data.batch-size"
        )
    source = _source(cfg, datasets.train, task, accelerator)
    train_data = TrainData(source, plan, _transform(cfg, task, accelerator), cfg.seed, cfg.data.shuffle)
    return model, task, train_data, _eval_data(cfg, datasets.eval, task, accelerator)


@dataclass
class Run:
    """One training run: what the loop works with, and where it is. `_setup` builds and resumes it; the loop, the
    evaluation and the checkpointer read and advance its `state`, the one record of the position (step, epoch,
    samples, best, plateau), which every checkpoint saves."""

    cfg: TrainConfig
    accelerator: Accelerator
    dir: Path
    mlog: MetricsLog
    task: Task  # what is computed: the loss of a batch, the metrics
    model: Any  # prepared by Accelerate (DDP-wrapped under several processes, then compiled with --compile)
    plain: torch.nn.Module  # the recipe's module itself: evaluation, best weights, EMA
    optimizer: Any
    scheduler: LambdaLR
    plateau: Plateau | None
    ema: EMA | None
    train_data: TrainData
    eval_data: EvalData
    total_steps: int
    checkpointer: ckpt.Checkpointer
    meta: dict  # what every checkpoint records besides the tensors: fingerprint and config
    state: ckpt.TrainState
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last evaluation's metrics."""
    evaluated_step: int = -1
    """The step of the last evaluation (an evaluation due twice at one step runs once)."""
    saved_step: int = -1
    """The step of the last checkpoint of this run (the same step is never saved twice)."""
    stop: str | None = None
    """Why training ends before its last step: "early stopping" or "signal"."""
    flops_per_sample: float = 0.0
    """Forward FLOPs of one sample (torch.utils.flop_counter), for the achieved TFLOP/s and MFU."""
    clock: Clock = field(default_factory=Clock)
    """Where the wall time goes: start-up, training, evaluation, checkpoints."""

    @property
    def plan(self) -> TrainPlan:
        return self.train_data.plan

    @property
    def epoch(self) -> float:
        """Epochs done, as a fraction."""
        return self.state.epoch + self.state.samples_in_epoch / self.plan.num_samples


def _setup(
    cfg: TrainConfig, recipe: Recipe, accelerator: Accelerator, run_dir: Path, mlog: MetricsLog
) -> Run:
    world, device = accelerator.num_processes, accelerator.device
    model, task, train_data, eval_data = agreed(lambda: _build(cfg, recipe, accelerator))
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

    fingerprint = {
        "model": ckpt.model_fingerprint(model),
        "optimizer": cfg.optim.name,
        "global_batch": global_batch,
        "train_samples": plan.num_samples,
    }
    fsdp = cfg.parallel.strategy == "fsdp"
    parameters, trainable = parameter_count(model)
    aliases = tied_names(model)  # asked before sharding (see launcher.checkpoint.sharded)
    if fsdp and world > 1:  # sharded: FSDP2 itself, not Accelerate's DDP (see launcher.parallel)
        # FLOPs are counted on the whole model, and the optimizer is built right after sharding, before any
        # forward: FSDP2's lazy initialisation in a first forward without gradients replaces the parameters.
        flops = forward_flops(model.to(device), eval_data.first(), task.forward)
        model = shard(model, recipe.fsdp_units, cfg, world)
        groups = param_groups(task, model, cfg.optim)
        optimizer = accelerator.prepare_optimizer(build_optimizer(groups, cfg.optim))
        plain_model = model
    else:
        optimizer = build_optimizer(param_groups(task, model, cfg.optim), cfg.optim)
        model, optimizer = accelerator.prepare(model, optimizer)
        plain_model = accelerator.unwrap_model(model, keep_torch_compile=False)
        flops = forward_flops(plain_model, eval_data.first(), task.forward)
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
        sharded=fsdp,
        aliases=aliases,
    )
    # The main process alone picks and verifies the checkpoint and checks what changed; every rank loads it.
    resumed_from, record = agreed(lambda: resume.choose(cfg, checkpointer, fingerprint, plan), main_only=True)
    state = ckpt.TrainState()
    if resumed_from is not None:
        groups = param_groups(task, plain_model, cfg.optim)
        state = resume.load(resumed_from, record, cfg, model, optimizer, groups, accelerator, plan)
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
    return Run(cfg, accelerator, run_dir, mlog, task, model, plain_model, optimizer, scheduler, plateau, ema,
               train_data, eval_data, total_steps, checkpointer, meta, state, saved_step=state.step,
               flops_per_sample=flops)  # fmt: skip


def _format(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def _evaluate(run: Run) -> None:
    """Evaluate (once per step) and keep the books: best weights, early stopping, the plateau schedule, logs."""
    cfg, state, acc = run.cfg, run.state, run.accelerator
    if run.evaluated_step == state.step:
        return
    run.metrics, _ = evaluate(run.plain, run.eval_data, acc, run.task, collective=is_sharded(run.plain))
    if run.ema is not None:
        with run.ema.applied() as averaged:
            ema_eval, _ = evaluate(averaged, run.eval_data, acc, run.task, collective=is_sharded(averaged))
        run.metrics |= {f"ema_{k}": v for k, v in ema_eval.items() if k != "samples"}
    run.evaluated_step = state.step
    sign = 1.0 if cfg.key_metric_mode == "max" else -1.0
    value, previous_best = run.metrics[cfg.key_metric], state.best_value
    # NaN compares false with everything, so without the finiteness test a diverged run's NaN would be "better"
    # than nothing and its weights would become best.safetensors. A non-finite loss disqualifies whatever the key
    # metric: weights that give NaN logits still score an accuracy (of the argmax of NaN).
    finite = math.isfinite(value) and math.isfinite(run.metrics["loss"])
    improved = finite and (previous_best is None or sign * value > sign * previous_best)
    if improved:
        state.best_value, state.best_step = value, state.step
        if run.ema is not None and cfg.key_metric.startswith("ema_"):
            with run.ema.applied() as averaged:
                _save_weights(averaged, run.dir / "best.safetensors", acc.is_main_process)
        else:
            _save_weights(run.plain, run.dir / "best.safetensors", acc.is_main_process)
    elif not finite:
        log.warning("WARNING: a non-finite evaluation at step %d does not count as the best", state.step)
    run.mlog.write("eval", state.step, run.epoch, {**run.metrics, "best_" + cfg.key_metric: state.best_value})
    acc.log({f"eval/{k}": v for k, v in run.metrics.items() if k != "samples"}, step=state.step)
    shown = "  ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in run.metrics.items() if k != "samples")
    log.info("eval  step %d epoch %.2f: %s%s", state.step, run.epoch, shown, "  (best)" if improved else "")
    if cfg.early_stopping.patience:
        gain = math.inf if previous_best is None else sign * (value - previous_best)
        state.stale_evals = 0 if gain > cfg.early_stopping.min_delta else state.stale_evals + 1
        if state.stale_evals >= cfg.early_stopping.patience:
            run.stop = "early stopping"
            log.info(
                "early stopping at step %d: %s has not improved by more than %g for %d evaluations "
                "(best %s at step %s)",
                state.step, cfg.key_metric, cfg.early_stopping.min_delta, state.stale_evals,
                _format(state.best_value), state.best_step,
            )  # fmt: skip
            run.mlog.write("early_stop", state.step, run.epoch, {"stale_evals": state.stale_evals})
    if run.plateau is not None:
        before = run.plateau.scale
        run.plateau.step(run.metrics["loss"] if cfg.schedule.plateau_metric == "loss" else value)
        state.plateau = run.plateau.state_dict()
        if run.plateau.scale != before:
            # The next update (index state.step) already has its lr; a cut must apply to it, as it does when a
            # run resumed from this step's checkpoint builds its scheduler.
            reapply(run.scheduler)
            log.info("plateau: lr multiplier %.3g -> %.3g at step %d", before, run.plateau.scale, state.step)


def _save(run: Run) -> None:
    """A checkpoint of the current step, unless this run saved it already."""
    state = run.state
    if run.saved_step == state.step and run.checkpointer.list():
        return
    run.saved_step, start = state.step, time.perf_counter()
    if run.checkpointer.save(run.model, run.optimizer, run.accelerator.scaler, state, run.meta, ema=run.ema):
        blocked = time.perf_counter() - start
        if run.cfg.checkpoint.async_save:  # the checkpointer logs the commit itself
            log.info("checkpoint step %d: writing in the background (blocked %.2fs)", state.step, blocked)
        else:
            log.info("saved checkpoint step %d (%.2fs)", state.step, blocked)


def _due(happened: bool, count: int, every: int) -> bool:
    return happened and every > 0 and count % every == 0


def _logs(run: Run, step: int) -> bool:
    """Whether the update that makes the step count `step` is a logging step."""
    return step % run.cfg.logging.every_steps == 0 or step == run.total_steps


def _finished(run: Run) -> bool:
    # --max-steps counts optimizer updates; --max-epochs counts epochs (the same end unless fp16 skips steps).
    if run.stop is not None:
        return True
    state, cfg = run.state, run.cfg
    return state.step >= run.total_steps if cfg.max_steps is not None else state.epoch >= cfg.max_epochs


def _train(run: Run) -> dict[str, Any]:
    cfg, accelerator, model, state, task = run.cfg, run.accelerator, run.model, run.state, run.task
    plan = run.plan
    run.clock.loop_started = time.perf_counter()
    interval = IntervalLog(
        cfg, state, plan.num_samples, run.total_steps, accelerator, run.mlog, run.clock, run.flops_per_sample
    )
    accum, micro_per_epoch = cfg.grad_accum_steps, len(run.train_data)
    # Accelerate's optimizer wrapper only forwards step() and zero_grad() unless a grad scaler (fp16) is in use,
    # and doing so costs ~100 us per step on CPU (two is_lomo_available() import lookups and an inspect.signature
    # per call; benchmarks/loop_overhead.py): without a scaler, step the wrapped optimizer itself.
    stepper = run.optimizer if accelerator.scaler is not None else run.optimizer.optimizer
    # For the same reason, backward: accelerator.backward adds a division by its accumulation steps (always 1:
    # the loop scales losses itself) to what a scaler needs. The scale enters as backward's incoming gradient.
    backward = accelerator.backward if accelerator.scaler is not None else torch.Tensor.backward
    normaliser = _Normaliser(run)
    preemption.install()
    model.train()
    while not _finished(run):
        epoch, b = state.epoch, state.samples_in_epoch // plan.global_batch
        for batch in run.train_data.epoch(epoch, b):
            window_start = b - b % accum
            window_end = min(window_start + accum, micro_per_epoch)
            sync = b + 1 == window_end
            # The gradient is the mean over the window's units on all processes (see _Normaliser), also for the
            # shorter last window of an epoch. Non-final micro-batches skip DDP's all-reduce (no_sync).
            window_samples = sum(plan.global_count(i) for i in range(window_start, window_end))
            with gradient_sync(model, accelerator, sync):
                loss = task.loss(model, batch)
                backward(loss.sum, gradient=normaliser.scale(loss, window_samples))
            interval.add(loss)
            b += 1
            if not sync:
                continue
            normaliser.end_window()
            lr = stepper.param_groups[0]["lr"]
            if cfg.optim.grad_clip_norm > 0:
                interval.grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
            elif _logs(run, state.step + 1):
                # Unclipped, the norm is computed for the log only, at logging steps: one pass over the gradients
                # every --logging.every-steps (an infinite max norm scales them by exactly 1.0).
                interval.grad_norm = accelerator.clip_grad_norm_(model.parameters(), math.inf)
            stepped = optimizer_step(stepper)
            # The position first, then everything that reads it: an evaluation or a checkpoint of the epoch's
            # last step must see the epoch as finished.
            state.samples_seen += window_samples
            epoch_end = b == micro_per_epoch
            state.epoch, state.samples_in_epoch = (
                (epoch + 1, 0) if epoch_end else (epoch, b * plan.global_batch)
            )
            if stepped:
                if run.ema is not None:
                    run.ema.update(state.step)
                run.scheduler.step()
                state.step += 1
                interval.lrs.append((state.step, lr))
            else:
                interval.skipped += 1

            if stepped and _logs(run, state.step):
                interval.flush()
            if _due(stepped, state.step, cfg.eval_every_steps) or _due(
                epoch_end, state.epoch, cfg.eval_every_epochs
            ):
                with run.clock.measure("eval"):
                    _evaluate(run)
            if _due(stepped, state.step, cfg.checkpoint.every_steps) or _due(
                epoch_end, state.epoch, cfg.checkpoint.every_epochs
            ):
                with run.clock.measure("checkpoint"):
                    _save(run)
            if stepped and preemption.stop_agreed(accelerator, state.step, cfg.preemption.check_every_steps):
                run.stop = "signal"
            if _finished(run):
                break
    interval.flush()  # the steps since the last logging step (a signal or early stopping came in between)
    interval.bar.close()
    return _stopped(run) if run.stop == "signal" else _finish(run)


def _stopped(run: Run) -> dict[str, Any]:
    """After a stop signal: save this step, wait for the commit, requeue under SLURM."""
    _save(run)
    run.checkpointer.wait()  # the requeued job must find this checkpoint committed
    signal_name = preemption.received() or "a signal to another process"
    step = run.state.step
    log.info("stopped by %s at step %d after saving; %s", signal_name, step, _resume_hint(run.cfg, run.dir))
    preemption.requeue_after_save(run.accelerator, run.dir, step, run.cfg.preemption)
    return {"preempted": True, "signal": signal_name, "step": step, "run_dir": str(run.dir)}


def _finish(run: Run) -> dict[str, Any]:
    """At the end: the final evaluation and checkpoint, the EMA weights, the final record."""
    cfg, state = run.cfg, run.state
    with run.clock.measure("eval"):
        _evaluate(run)
    with run.clock.measure("checkpoint"):
        _save(run)
        run.checkpointer.wait()
    if run.ema is not None:
        with run.ema.applied() as averaged:
            _save_weights(averaged, run.dir / "ema.safetensors", run.accelerator.is_main_process)
    final = {**run.metrics, "best_" + cfg.key_metric: state.best_value, "best_step": state.best_step,
             "memory": _memory(run), "time": run.clock.split()}  # fmt: skip
    run.mlog.write("final", state.step, run.epoch, final)
    log.info(
        "done: step %d, final %s %.4f, best %s at step %s; run directory %s",
        state.step, cfg.key_metric, run.metrics[cfg.key_metric], _format(state.best_value), state.best_step,
        run.dir,
    )  # fmt: skip
    return {**run.metrics, "best": state.best_value, "step": state.step, "run_dir": str(run.dir)}


def param_groups(task: Task, model: torch.nn.Module, optim: OptimConfig) -> Any:
    """The task's parameter groups for the optimizer, or all of the model's parameters."""
    groups = task.param_groups(model, optim)
    return model.parameters() if groups is None else groups


class _Normaliser:
    """How each micro-batch's summed loss becomes the big batch's mean gradient (launcher.task explains why).

    DDP averages the gradients of the processes, so every scale carries the process count. Units that are samples
    are known before the forward pass: the scale is processes / samples of the window. Units the task counts
    (tokens) are known only after it: in a window of one micro-batch, the all-reduced count scales that backward;
    in a longer one, the plain sums are backpropagated, the counts added up on the device, and the gradients
    divided by their all-reduced total at the window's end. No host sync either way, besides the check of the
    task's first loss."""

    def __init__(self, run: Run) -> None:
        self.task, self.model, self.device = run.task, run.model, run.accelerator.device
        self.world, self.accum = run.accelerator.num_processes, run.cfg.grad_accum_steps
        self.counted: bool | None = None  # decided by the first loss
        self.units = torch.zeros((), dtype=torch.float64, device=self.device)  # of the window so far
        self._constants: dict[float, torch.Tensor] = {}

    def _constant(self, value: float) -> torch.Tensor:
        """One cached tensor per distinct value, instead of a new tensor every step."""
        if value not in self._constants:
            self._constants[value] = torch.tensor(value, device=self.device)
        return self._constants[value]

    def scale(self, loss: Any, window_samples: int) -> torch.Tensor:
        """The incoming gradient for this micro-batch's `loss.sum`."""
        if self.counted is None:
            self.counted = _check_loss(loss, self.task)
        if (loss.count is not None) != self.counted:
            raise UserError(
                f"{type(self.task).__qualname__}.loss returned a count for some batches and None for others; "
                "return a count for every batch, or for none (then the units are samples)"
            )
        if not self.counted:
            return self._constant(self.world / window_samples)
        count = torch.as_tensor(loss.count, device=self.device).to(torch.float64)
        if self.accum == 1:
            if self.world > 1:
                torch.distributed.all_reduce(count)
            return (self.world / count).to(loss.sum.dtype)
        self.units += count
        return self._constant(1.0)

    def end_window(self) -> None:
        """After the window's last backward: divide by its counted units, where they were not known earlier."""
        if not self.counted or self.accum == 1:
            return
        if self.world > 1:
            torch.distributed.all_reduce(self.units)
        # The local shards of a sharded model's gradients: the factor is the same for every element.
        grads = [local_shard(p.grad) for p in self.model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, (self.world / self.units).to(grads[0].dtype))
        self.units.zero_()


def _check_loss(loss: Any, task: Task) -> bool:
    """What the task's loss returned, checked once: a wrong return value is one clear error at the first step
    rather than a traceback (or NaN) somewhere later."""
    where = f"{type(task).__qualname__}.loss"
    if not isinstance(loss, Loss):
        raise UserError(f"{where} must return a launcher.Loss(sum, count), got a {type(loss).__name__}")
    if not isinstance(loss.sum, torch.Tensor) or loss.sum.dim() != 0:
        shape = tuple(loss.sum.shape) if isinstance(loss.sum, torch.Tensor) else type(loss.sum).__name__
        raise UserError(
            f"{where} returned a sum of shape {shape}, not a scalar: add up the per-unit losses "
            "(reduction='sum') and return their count beside it"
        )
    if loss.count is not None and not float(loss.count) > 0:
        raise UserError(
            f"{where} returned a count of {float(loss.count):g}: the count is the number of units (tokens, "
            "pixels, samples) the sum adds up, and must be positive"
        )
    return loss.count is not None


def _memory(run: Run) -> list[dict[str, int]]:
    """Per rank: the bytes of the parameters, gradients and optimizer state it holds (a sharded tensor's local
    shard only) and its peak resident memory. Every rank takes part (one object all-gather)."""
    tensors = [p for p in run.model.parameters()] + [
        p.grad for p in run.model.parameters() if p.grad is not None
    ]
    tensors += [v for s in run.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    held = sum(t.numel() * t.element_size() for t in map(local_shard, tensors))
    mine = {"state_bytes": held, "peak_rss_bytes": peak_rss_bytes()}
    if run.accelerator.num_processes == 1:
        return [mine]
    everyone: list[Any] = [None] * run.accelerator.num_processes
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def optimizer_step(stepper: Any) -> bool:
    """Step and zero the gradients; False when the fp16 grad scaler skipped the update (inf/NaN gradients), which
    then must not advance the schedule, the EMA or the step count. `stepper` is Accelerate's optimizer wrapper
    when a scaler is in use (its step_was_skipped says so), else the plain optimizer, which never skips."""
    stepper.step()
    stepper.zero_grad(set_to_none=True)
    return not getattr(stepper, "step_was_skipped", False)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "python -m launcher.train RECIPE"
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
        printing = "--print-config" in argv
        flags = [a for a in argv[1:] if a != "--print-config"]
        cfg = parse_config(recipe, flags, prog=f"python -m launcher.train {argv[0]}")
        if printing:
            if rank == 0:
                print(config_yaml(cfg, recipe), end="")
            return 0
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
