"""What a run reports while it trains: the training metrics of each logging interval (loss, samples/s, lr,
gradient norm) into metrics.jsonl, TensorBoard and the progress bar, and the divergence check."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from launcher.checkpoint import TrainState
from launcher.config import TrainConfig
from launcher.errors import TrainingDiverged, UserError
from launcher.parallel import local
from launcher.ranks import PeerFailed
from launcher.run_dir import MetricsLog
from launcher.task import Loss

log = logging.getLogger("launcher")


class IntervalLog:
    """The training metrics of one logging interval: summed on the device, read back once at its end.

    Step convention (TensorBoard and metrics.jsonl alike): a value logged at step N belongs to the N-th optimizer
    update, the one that brought the step count to N; `train/lr` at N is the lr that update used, and
    `train/loss` at N the mean loss of the updates since the previous logging step, up to and including N."""

    def __init__(
        self,
        cfg: TrainConfig,
        state: TrainState,
        num_samples: int,
        total_steps: int,
        accelerator: Accelerator,
        mlog: MetricsLog,
    ):
        self.cfg, self.state, self.accelerator, self.mlog = cfg, state, accelerator, mlog
        self.num_samples = num_samples
        self.loss_sum = torch.zeros((), device=accelerator.device)
        # Units the task counted itself (tokens, pixels), when it does; otherwise the loss is per sample.
        self.units: torch.Tensor | None = None
        self.metric_sums: dict[str, torch.Tensor] = {}  # the task's training metrics, summed like the loss
        self.grad_norm: torch.Tensor | None = None
        self.lrs: list[tuple[int, float]] = []  # (step, lr) of every update of the interval
        self.skipped = 0  # updates the fp16 grad scaler skipped (inf/NaN gradients) in this interval
        tensorboard = accelerator.is_main_process and cfg.logging.tensorboard
        self.writer = accelerator.get_tracker("tensorboard", unwrap=True) if tensorboard else None
        self.paused = 0.0  # seconds spent evaluating and saving, left out of samples/s
        self.bar = tqdm(
            total=total_steps, initial=state.step, dynamic_ncols=True, desc="train",
            disable=not (accelerator.is_main_process and cfg.logging.progress_bar),
        )  # fmt: skip
        self._mark()

    def add(self, loss: Loss) -> None:
        """One micro-batch's loss and training metrics (on the device; nothing is read back here)."""
        self.loss_sum += loss.sum.detach()
        if loss.count is not None:
            if self.units is None:
                self.units = torch.zeros((), dtype=torch.float64, device=self.loss_sum.device)
            self.units += loss.count
        for name, value in loss.metrics.items():
            value = value.detach()
            self.metric_sums[name] = self.metric_sums[name] + value if name in self.metric_sums else value

    def _mark(self, now: float | None = None) -> None:
        self.start_step, self.start_samples = self.state.step, self.state.samples_seen
        self.start_time, self.paused = time.perf_counter() if now is None else now, 0.0

    def flush(self) -> None:
        """Log the interval: the only host sync of the hot path. A non-finite loss stops the run here (unless
        --no-stop-on-nonfinite), before anything of this step is evaluated or saved."""
        state, acc, first = self.state, self.accelerator, self.start_step
        if state.samples_seen == self.start_samples:  # nothing trained since the last flush
            return
        now = time.perf_counter()
        samples = state.samples_seen - self.start_samples
        if self.units is None and not self.metric_sums:
            loss, units = acc.reduce(self.loss_sum, "sum").item(), samples
            means = {}
        else:  # one all-reduce and one read-back for all of them
            counted = (
                self.units if self.units is not None else torch.zeros_like(self.loss_sum, dtype=torch.float64)
            )
            sums = torch.stack(
                [self.loss_sum.double(), counted, *(v.double() for v in self.metric_sums.values())]
            )
            loss, counted_units, *metric_totals = acc.reduce(sums, "sum").tolist()
            units = counted_units if self.units is not None else samples
            if units == 0:
                raise UserError(
                    f"the task's loss counted 0 units in every micro-batch of steps {first + 1}-{state.step}: "
                    "Task.loss must return a positive count (the number of tokens, pixels or samples its sum "
                    "adds up)"
                )
            means = {f"train/{k}": v / units for k, v in zip(self.metric_sums, metric_totals, strict=True)}
            self.units = None if self.units is None else self.units.zero_()
            self.metric_sums.clear()
        loss /= max(1, units)
        values = {
            "train/loss": loss,
            **means,
            "train/samples_per_s": samples / (now - self.start_time - self.paused),
        }
        if self.grad_norm is not None:
            values["train/grad_norm"] = local(self.grad_norm).item()
        epoch = state.epoch + state.samples_in_epoch / self.num_samples
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
        state = self.state
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
