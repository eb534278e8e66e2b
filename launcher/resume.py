"""Resuming: which checkpoint, whether it fits this run, and what a changed setting does.

How a resume treats a setting that differs from the checkpoint's run (torchtune's field-by-field policy): fields
under `APPLIED` are applied from the resumed step on, each named in a warning; `seed` mid-epoch and the key metric
are refused unless --allow-resume-changes (the data order would change halfway through an epoch; the best so far
was measured in another metric); the model, optimizer and global batch are the fingerprint's, refused likewise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from launcher import checkpoint as ckpt
from launcher.config import TrainConfig, flatten, to_dict
from launcher.data import TrainPlan
from launcher.errors import UserError
from launcher.optim import apply_hyperparameters

log = logging.getLogger("launcher")

APPLIED = ("optim.", "schedule.", "ema.", "early_stopping.", "max_epochs", "max_steps")
KEY_METRIC = ("key_metric", "key_metric_mode")


def changes(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Settings of this run that differ from the checkpoint's run: {dotted name: (old, new)}."""
    old, new = flatten(saved), flatten(to_dict(cfg))
    return {k: (old[k], new[k]) for k in new if k in old and old[k] != new[k]}


def choose(
    cfg: TrainConfig, checkpointer: ckpt.Checkpointer, fingerprint: dict, plan: TrainPlan
) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its verified state.json, after checking that it fits this run."""
    found = ckpt.find_resume(cfg.resume, checkpointer)
    if found is None:
        return None, None
    path, record = found
    problems = ckpt.check_compatible(record, fingerprint, path)
    position = normalised(record["state"], plan)["samples_in_epoch"]
    changed = changes(record["config"], cfg)
    if "seed" in changed and position:
        problems.append(f"seed {changed['seed'][0]} -> {changed['seed'][1]} in the middle of an epoch (the data "
                        "order of the rest of the epoch would change)")  # fmt: skip
    for key in KEY_METRIC:
        if key in changed:
            old, new = changed[key]
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
        for k, (old, new) in changed.items()
        if k.startswith(APPLIED) and k != "optim.name"
    ]
    if applied:
        log.warning(
            "WARNING: resuming with changed settings, applied from step %d on: %s",
            record["state"]["step"],
            "; ".join(applied),
        )
    if position % plan.global_batch:
        raise UserError(
            f"the checkpoint stopped {position} samples into an epoch, not a multiple of "
            f"this run's global micro-batch {plan.global_batch}; keep --data.batch-size x processes"
        )
    return path, record


def normalised(saved: dict[str, Any], plan: TrainPlan) -> dict[str, Any]:
    """The saved position with a finished epoch counted as finished: checkpoints written before the epoch
    bookkeeping moved ahead of the saves recorded the last step of an epoch as `samples_in_epoch == num_samples`."""
    if saved["samples_in_epoch"] >= plan.num_samples:
        return {**saved, "epoch": saved["epoch"] + 1, "samples_in_epoch": 0}
    return saved


def load(
    path: Path,
    record: dict,
    cfg: TrainConfig,
    model: Any,
    optimizer: Any,
    groups: Any,
    accelerator: Accelerator,
    plan: TrainPlan,
) -> ckpt.TrainState:
    """Every rank: the checkpoint `choose` picked into the model, optimizer, scaler and RNG; the position it
    resumes at, with this run's optimizer hyperparameters."""
    ckpt.load(path, model, optimizer, accelerator.scaler, accelerator, record)
    apply_hyperparameters(optimizer, cfg.optim, groups)
    state = ckpt.TrainState(**normalised(record["state"], plan))
    if any(k in changes(record["config"], cfg) for k in KEY_METRIC):  # allowed, so the best starts over
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
