"""Learning-rate schedules as pure functions of the optimizer step.

`lr_multiplier(step, steps, cfg)` is the factor applied to the peak lr for the update with index `step`
(0 for the first optimizer step). Nothing else is state, so resuming needs only the step, and
`torch.optim.lr_scheduler.LambdaLR` applies it.

- Warm-up (steps 0..W-1), from `warmup_start_factor` (s) to 1:
  linear s + (1 - s) * step / W; exponential s ** (1 - step / W); constant s.
- After warm-up: constant 1; cosine from 1 at step W down to `min_lr_factor` at step `total`;
  step gamma ** (step // step_size); multistep gamma ** (milestones passed). Step and multi-step count from
  the start of training (so milestones read as "epoch 20, 40, 60"), cosine from the end of warm-up.
- plateau: the one schedule that is not a function of the step. At each evaluation, ReduceLROnPlateau's rule
  decides whether to multiply the lr by gamma; its state (three numbers) is saved in checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

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
    """The plateau schedule's decisions as a multiplier in [min_lr_factor, 1], on top of the warm-up.

    torch's ReduceLROnPlateau rule on a number instead of an optimizer's lr (tests/test_loop_extras.py checks the
    two agree step for step): an evaluation is an improvement when it beats the best so far by the relative
    `plateau_threshold`; after more than `plateau_patience` evaluations without one, the multiplier is multiplied
    by `gamma` (never below `min_lr_factor`). The real optimizer's lr stays owned by the LambdaLR, which
    multiplies the two.
    """

    def __init__(self, cfg: ScheduleConfig, mode: str) -> None:
        self.factor, self.patience, self.threshold = cfg.gamma, cfg.plateau_patience, cfg.plateau_threshold
        self.min_scale, self.mode = cfg.min_lr_factor, mode
        self.scale = 1.0
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_evals = 0

    def _better(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best * (1.0 - self.threshold)
        return value > self.best * (1.0 + self.threshold)

    def step(self, metric: float) -> None:
        value = float(metric)
        if self._better(value):  # NaN is never better: it counts as an evaluation without improvement
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        if self.bad_evals > self.patience:
            cut = max(self.scale * self.factor, self.min_scale)
            if self.scale - cut > 1e-8:  # torch's eps: a cut smaller than this is ignored
                self.scale = cut
            self.bad_evals = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.best, self.bad_evals = state["scale"], state["best"], state["bad_evals"]


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
