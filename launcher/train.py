"""The training loop: `accelerate launch -m launcher.train RECIPE [--field.name value ...]`.

Setup, resume, train, evaluate, save, in that order. Accelerate owns devices, DDP and mixed precision; the
recipe owns the model and the data; everything else is this file and its small helpers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, parse_flag_from_env, set_seed
from safetensors.torch import save_file
from tqdm.auto import tqdm

from launcher import checkpoint as ckpt
from launcher import preemption
from launcher.config import OptimConfig, TrainConfig, to_dict
from launcher.data import DeviceTransform, EvalData, Source, TrainData, TrainPlan
from launcher.errors import UserError
from launcher.evaluate import evaluate
from launcher.recipe import Recipe, load_recipe, parse_config
from launcher.run_dir import MetricsLog, default_run_name, setup_console, write_provenance
from launcher.schedules import make_scheduler, run_length, schedule_steps
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


def _run_dir(cfg: TrainConfig, recipe: Recipe) -> Path:
    """The run directory, named once on the main process and shared (a timestamp differs between ranks)."""
    name = [cfg.run_name or default_run_name(recipe.name + ("-test" if cfg.phase == "test" else ""))]
    if _process_state().num_processes > 1:
        broadcast_object_list(name)
    return cfg.output_dir / name[0]


def _make_accelerator(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard" if cfg.logging.tensorboard else None,
        project_dir=run_dir,
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


def _save_best(model: torch.nn.Module, path: Path) -> None:
    """best.safetensors, written to a temporary name and renamed, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    weights = strip_prefixes(model.state_dict())
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def run(cfg: TrainConfig, recipe: Recipe) -> dict[str, Any]:
    """Train (or test) one recipe configuration; returns the final evaluation metrics."""
    run_dir = _run_dir(cfg, recipe)
    state = _process_state()
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    setup_console(run_dir, state.is_main_process)
    accelerator = _make_accelerator(cfg, run_dir)
    try:
        if accelerator.is_main_process:
            write_provenance(run_dir, cfg, accelerator.num_processes, recipe.path)
        if cfg.phase == "test":
            return _test(cfg, recipe, accelerator, run_dir)
        return _train(cfg, recipe, accelerator, run_dir)
    finally:
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
    model = recipe.build_model(cfg)
    assert cfg.weights is not None
    load_into(model, read_weights(cfg.weights), source=str(cfg.weights))
    model = accelerator.prepare_model(model, evaluation_mode=True)
    eval_data = _eval_data(cfg, recipe.build_datasets(cfg).eval, accelerator)
    metrics = evaluate(accelerator.unwrap_model(model), eval_data, accelerator)
    log.info(
        "test  %s: loss %.4f  accuracy %.4f  (%d samples)",
        cfg.weights,
        metrics["loss"],
        metrics["accuracy"],
        metrics["samples"],
    )
    metrics_log = MetricsLog(run_dir / "metrics.jsonl" if accelerator.is_main_process else None)
    metrics_log.write("test", 0, 0.0, {"weights": str(cfg.weights), **metrics})
    metrics_log.close()
    return metrics


def _train(cfg: TrainConfig, recipe: Recipe, accelerator: Accelerator, run_dir: Path) -> dict[str, Any]:
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    _seed(cfg)
    model = recipe.build_model(cfg)
    if cfg.weights is not None:
        load_into(model, read_weights(cfg.weights), source=str(cfg.weights))
    set_seed(cfg.seed, device_specific=True)  # dropout & co. differ between ranks; init above did not

    datasets = recipe.build_datasets(cfg)
    transform = DeviceTransform(cfg.data, cfg.seed, device)
    plan = TrainPlan(len(datasets.train), cfg.data.batch_size, world, rank, cfg.data.drop_last)
    if plan.batches_per_epoch == 0:
        raise UserError(
            f"the training set ({plan.num_samples} samples) is smaller than one global batch "
            f"({plan.global_batch}); lower --data.batch-size"
        )
    train_source = Source(datasets.train, cfg.data.in_memory, device, cfg.data.num_workers)
    train_data = TrainData(train_source, plan, transform, cfg.seed, cfg.data.shuffle)
    eval_data = _eval_data(cfg, datasets.eval, accelerator)

    accum = cfg.grad_accum_steps
    micro_per_epoch = len(train_data)
    steps_per_epoch, total_steps = run_length(micro_per_epoch, accum, cfg.max_epochs, cfg.max_steps)
    max_epochs = math.ceil(total_steps / steps_per_epoch)
    global_batch = plan.global_batch * accum
    log.info(
        "run %s | %d process(es) on %s | global batch %d = %d per device x %d processes x %d accumulation | "
        "%d optimizer steps per epoch, %d in total",
        run_dir,
        world,
        device.type,
        global_batch,
        cfg.data.batch_size,
        world,
        accum,
        steps_per_epoch,
        total_steps,
    )

    optimizer = build_optimizer(model.parameters(), cfg.optim)
    fingerprint = {
        "model": ckpt.model_fingerprint(model),
        "optimizer": cfg.optim.name,
        "global_batch": global_batch,
        "train_samples": plan.num_samples,
    }
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpointer = ckpt.Checkpointer(
        run_dir, accelerator, cfg.checkpoint.keep_last, cfg.checkpoint.tolerate_save_failures
    )
    resumed_from = ckpt.resolve_resume(cfg.resume, checkpointer)
    state = _resume(resumed_from, cfg, model, optimizer, accelerator, fingerprint)
    steps = schedule_steps(cfg.schedule, steps_per_epoch, total_steps)
    scheduler = make_scheduler(optimizer.optimizer, steps, cfg.schedule, last_step=state.step)
    start_batch = state.samples_in_epoch // plan.global_batch
    if state.samples_in_epoch % plan.global_batch:
        raise UserError(
            f"the checkpoint stopped {state.samples_in_epoch} samples into an epoch, not a multiple of "
            f"this run's global micro-batch {plan.global_batch}; keep --data.batch-size x processes"
        )

    metrics_log = MetricsLog(run_dir / "metrics.jsonl" if accelerator.is_main_process else None)
    metrics_log.write(
        "setup",
        state.step,
        state.epoch,
        {
            "processes": world,
            "per_device_batch": cfg.data.batch_size,
            "grad_accum_steps": accum,
            "global_batch": global_batch,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "mixed_precision": "no"
            if cfg.mixed_precision == "fp16" and device.type == "cpu"
            else cfg.mixed_precision,
            "resumed_from": str(resumed_from) if resumed_from else None,
        },
    )
    if accelerator.is_main_process and cfg.logging.tensorboard:
        accelerator.init_trackers("tensorboard")
    meta = {"fingerprint": fingerprint, "config": to_dict(cfg)}
    best_path = run_dir / "best.safetensors"
    sign = 1.0 if cfg.key_metric_mode == "max" else -1.0
    last_eval: dict[str, Any] = {}
    eval_step = -1
    paused = 0.0  # seconds spent evaluating and saving since the last log, left out of samples/s

    def do_eval() -> None:
        nonlocal last_eval, eval_step, paused
        if eval_step == state.step:
            return
        start = time.perf_counter()
        last_eval, eval_step = evaluate(accelerator.unwrap_model(model), eval_data, accelerator), state.step
        epoch_f = state.epoch + state.samples_in_epoch / plan.num_samples
        value = last_eval[cfg.key_metric]
        improved = state.best_value is None or sign * value > sign * state.best_value
        if improved:
            state.best_value, state.best_step = value, state.step
            if accelerator.is_main_process:
                _save_best(accelerator.unwrap_model(model, keep_torch_compile=False), best_path)
        metrics_log.write(
            "eval", state.step, epoch_f, {**last_eval, "best_" + cfg.key_metric: state.best_value}
        )
        accelerator.log({f"eval/{k}": v for k, v in last_eval.items() if k != "samples"}, step=state.step)
        log.info(
            "eval  step %d epoch %.2f: loss %.4f  accuracy %.4f%s",
            state.step,
            epoch_f,
            last_eval["loss"],
            last_eval["accuracy"],
            "  (best)" if improved else "",
        )
        paused += time.perf_counter() - start

    def do_save() -> None:
        nonlocal paused, saved_step
        if saved_step == state.step and checkpointer.list():
            return
        saved_step = state.step
        start = time.perf_counter()
        if checkpointer.save(model, optimizer, accelerator.scaler, state, meta):
            log.info("saved checkpoint step %d (%.2fs)", state.step, time.perf_counter() - start)
        paused += time.perf_counter() - start

    bar = tqdm(
        total=total_steps,
        initial=state.step,
        disable=not (accelerator.is_main_process and cfg.logging.progress_bar),
        dynamic_ncols=True,
        desc="train",
    )
    loss_sum = torch.zeros((), device=device)  # training loss summed since the last log, on the device
    grad_norm: torch.Tensor | None = None
    lrs: list[tuple[int, float]] = []  # (step, lr) of every step since the last log; written at the log step
    logged_step, logged_samples, logged_time = state.step, state.samples_seen, time.perf_counter()
    saved_step = state.step
    stopped_by_signal = False
    preemption.install()
    model.train()

    while state.step < total_steps and state.epoch < max_epochs:
        epoch = state.epoch
        b = start_batch
        for images, labels in train_data.epoch(epoch, start_batch):
            window_start = b - b % accum
            window_end = min(window_start + accum, micro_per_epoch)
            sync = b + 1 == window_end
            # Normalise by the samples of the whole window on all processes, times the process count that
            # DDP's averaging divides by: the gradient is the mean over the global batch, also for the shorter
            # last window of an epoch. Non-final micro-batches skip DDP's all-reduce (no_sync).
            window_samples = sum(plan.global_count(i) for i in range(window_start, window_end))
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                logits = model(images)
                loss = F.cross_entropy(logits, labels, reduction="sum")
                accelerator.backward(loss * (world / window_samples))
            loss_sum += loss.detach()
            b += 1
            if not sync:
                continue
            if cfg.optim.grad_clip_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lrs.append((state.step, scheduler.get_last_lr()[0]))
            scheduler.step()
            state.step += 1
            state.samples_in_epoch = min(b * plan.global_batch, plan.num_samples)
            state.samples_seen += window_samples

            if state.step % cfg.logging.every_steps == 0 or state.step == total_steps:
                # The only host sync of the hot path: once per logging interval.
                now = time.perf_counter()
                samples = state.samples_seen - logged_samples
                train_loss = accelerator.reduce(loss_sum, "sum").item() / max(1, samples)
                values = {
                    "train/loss": train_loss,
                    "train/samples_per_s": samples / (now - logged_time - paused),
                }
                if grad_norm is not None:
                    values["train/grad_norm"] = grad_norm.item()
                epoch_f = epoch + state.samples_in_epoch / plan.num_samples
                metrics_log.write(
                    "train",
                    state.step,
                    epoch_f,
                    {k.split("/")[1]: v for k, v in values.items()} | {"lr": lrs[-1][1]},
                )
                for step_i, lr in lrs:
                    accelerator.log({"train/lr": lr}, step=step_i)
                accelerator.log(values, step=state.step)
                bar.update(state.step - logged_step)
                bar.set_postfix(
                    loss=f"{train_loss:.4f}",
                    lr=f"{lrs[-1][1]:.3g}",
                    sps=f"{values['train/samples_per_s']:.0f}",
                )
                loss_sum.zero_()
                lrs.clear()
                logged_step, logged_samples, logged_time, paused = state.step, state.samples_seen, now, 0.0
            if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
                do_eval()
            if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
                do_save()
            if preemption.stop_agreed(accelerator):
                stopped_by_signal = True
                break
            if state.step >= total_steps:
                break
        if b == micro_per_epoch:  # the epoch ran to its end (perhaps exactly at the step limit)
            state.epoch, state.samples_in_epoch = epoch + 1, 0
            if not stopped_by_signal and cfg.eval_every_epochs and state.epoch % cfg.eval_every_epochs == 0:
                do_eval()
            if cfg.checkpoint.every_epochs and state.epoch % cfg.checkpoint.every_epochs == 0:
                do_save()
        start_batch = 0
        if stopped_by_signal:
            break
    bar.close()

    if stopped_by_signal:
        do_save()
        log.info("stopped by a signal at step %d after saving; rerun the same command to resume", state.step)
        metrics_log.close()
        return {"preempted": True, "step": state.step, "run_dir": str(run_dir)}

    do_eval()
    do_save()
    metrics_log.write(
        "final",
        state.step,
        state.epoch + state.samples_in_epoch / plan.num_samples,
        {**last_eval, "best_" + cfg.key_metric: state.best_value, "best_step": state.best_step},
    )
    metrics_log.close()
    log.info(
        "done: step %d, final %s %.4f, best %.4f at step %s; run directory %s",
        state.step,
        cfg.key_metric,
        last_eval[cfg.key_metric],
        state.best_value,
        state.best_step,
        run_dir,
    )
    return {**last_eval, "best": state.best_value, "step": state.step, "run_dir": str(run_dir)}


def _resume(
    path: Path | None,
    cfg: TrainConfig,
    model: Any,
    optimizer: Any,
    accelerator: Accelerator,
    fingerprint: dict,
) -> ckpt.TrainState:
    if path is None:
        return ckpt.TrainState()
    record = ckpt.verify(path)
    problems = ckpt.check_compatible(record, fingerprint, path)
    if problems and not cfg.allow_resume_changes:
        raise UserError(
            f"cannot resume from {path}: this run differs in what it trains:\n  "
            + "\n  ".join(problems)
            + "\nStart a new run (--run-name NEW or --resume none), or pass --allow-resume-changes"
        )
    for problem in problems:
        log.warning("WARNING: resuming despite a change (--allow-resume-changes): %s", problem)
    ckpt.load(path, model, optimizer, accelerator.scaler, accelerator)
    state = ckpt.TrainState(**record["state"])
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
    is_main = os.environ.get("RANK", "0") == "0"
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
        result = run(cfg, recipe)
    except UserError as exc:
        if is_main:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    return preemption.EXIT_PREEMPTED if result.get("preempted") else 0


if __name__ == "__main__":
    sys.exit(main())
