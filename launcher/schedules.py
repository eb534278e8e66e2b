"""Learning-rate schedules as pure functions of the optimizer step.

`lr_multiplier(step, steps, cfg)` is the factor applied to the peak lr for the update with index `step`
(0 for the first optimizer step). Nothing else is state, so resuming needs only the step, and
`torch.optim.lr_scheduler.LambdaLR` applies it.

- Warm-up (steps 0..W-1), from `warmup_start_factor` (s) to 1:
  linear s + (1 - s) * step / W; exponential s ** (1 - step / W); constant s.
- After warm-up: constant 1; cosine from 1 at step W down to `min_lr_factor` at step `total`;
  step gamma ** (step // step_size); multistep gamma ** (milestones passed). Step and multi-step count from
  the start of training (so milestones read as "epoch 20, 40, 60"), cosine from the end of warm-up.
- plateau: the one schedule that is not a function of the step. torch's ReduceLROnPlateau decides, at each
  evaluation, whether to multiply the lr by gamma; its state is saved in checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from launcher.config import ScheduleConfig


@dataclass(frozen=True)
class ScheduleSteps:
    """The schedule's lengths converted from epochs to optimizer steps."""

    total: int
    warmup: int
    step_size: int
    milestones: tuple[int, ...]
    steps_per_epoch: int


def run_length(micro_batches_per_epoch: int, grad_accum_steps: int, max_epochs: int, max_steps: int | None):
    """(optimizer steps per epoch, total optimizer steps); the last window of an epoch may be shorter."""
    steps_per_epoch = math.ceil(micro_batches_per_epoch / grad_accum_steps)
    return steps_per_epoch, max_steps if max_steps is not None else steps_per_epoch * max_epochs


def schedule_steps(cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> ScheduleSteps:
    if cfg.warmup == "none":
        warmup = 0
    elif cfg.warmup_steps is not None:
        warmup = cfg.warmup_steps
    else:
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return ScheduleSteps(
        total=total_steps,
        warmup=max(0, warmup),
        step_size=max(1, round(cfg.step_size_epochs * steps_per_epoch)),
        milestones=tuple(sorted(round(m * steps_per_epoch) for m in cfg.milestones_epochs)),
        steps_per_epoch=steps_per_epoch,
    )


def lr_multiplier(step: int, steps: ScheduleSteps, cfg: ScheduleConfig) -> float:
    if step < steps.warmup:
        s, frac = cfg.warmup_start_factor, step / steps.warmup
        if cfg.warmup == "linear":
            return s + (1.0 - s) * frac
        if cfg.warmup == "exponential":
            return s ** (1.0 - frac)
        return s  # constant
    if cfg.decay == "cosine":
        span = max(1, steps.total - steps.warmup)
        t = min(1.0, (step - steps.warmup) / span)
        return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.decay == "step":
        return cfg.gamma ** (step // steps.step_size)
    if cfg.decay == "multistep":
        return cfg.gamma ** sum(step >= m for m in steps.milestones)
    return 1.0  # constant, and plateau (whose scale the scheduler multiplies in)


class Plateau:
    """ReduceLROnPlateau's decisions as a multiplier in [min_lr_factor, 1], on top of the warm-up.

    torch's scheduler runs on a one-parameter stand-in optimizer with lr 1, so its lr *is* the multiplier; the
    real optimizer's lr stays owned by the LambdaLR, which multiplies the two.
    """

    def __init__(self, cfg: ScheduleConfig, mode: str) -> None:
        self._optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        self.scheduler = ReduceLROnPlateau(
            self._optimizer,
            mode=mode,
            factor=cfg.gamma,
            patience=cfg.plateau_patience,
            threshold=cfg.plateau_threshold,
            min_lr=cfg.min_lr_factor,
        )

    @property
    def scale(self) -> float:
        return self._optimizer.param_groups[0]["lr"]

    def step(self, metric: float) -> None:
        self.scheduler.step(metric)

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self._optimizer.param_groups[0]["lr"] = state["scale"]


def make_scheduler(
    optimizer: Optimizer,
    steps: ScheduleSteps,
    cfg: ScheduleConfig,
    last_step: int = 0,
    plateau: Plateau | None = None,
) -> LambdaLR:
    """A LambdaLR positioned so that the next optimizer step uses lr_multiplier(last_step) (x the plateau scale).

    On resume the optimizer's param groups (loaded from the checkpoint) already hold `initial_lr`.
    """
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    if plateau is None:
        return LambdaLR(optimizer, lambda step: lr_multiplier(step, steps, cfg), last_epoch=last_step - 1)
    return LambdaLR(
        optimizer, lambda step: lr_multiplier(step, steps, cfg) * plateau.scale, last_epoch=last_step - 1
    )


def reapply(scheduler: LambdaLR) -> None:
    """Recompute the lr of the next update from the scheduler's current position, after something its lambdas
    read changed between steps (the plateau scale, cut at an evaluation). LambdaLR only recomputes in step()."""
    step = scheduler.last_epoch
    for group, base, fn in zip(
        scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base * fn(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
