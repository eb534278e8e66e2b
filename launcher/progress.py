"""What a run reports while it trains: the training metrics of each logging interval (loss, samples/s, lr,
gradient norm) into metrics.jsonl, TensorBoard and the progress bar, and the divergence check."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
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
from launcher.throughput import (
    achieved_tflops,
    format_mfu,
    peak_memory,
    peak_tflops,
    reset_peak_memory,
    training_flops,
)

log = logging.getLogger("launcher")


class Clock:
    """Where a run's wall time goes: start-up (the interpreter, imports, data loading, model build, resume),
    training, evaluation, and the time checkpoints block training (`measure` around each evaluation and save).
    The interval logs leave evaluation and saving out of their samples/s."""

    def __init__(self) -> None:
        now = time.perf_counter()
        age = _process_age()
        self.started = now - age if age is not None else now  # this process's start, where the OS says
        self.loop_started = now
        self.seconds = {"eval": 0.0, "checkpoint": 0.0}

    @contextlib.contextmanager
    def measure(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - start

    def paused(self) -> float:
        """Seconds spent evaluating and saving so far."""
        return sum(self.seconds.values())

    def split(self) -> dict[str, float]:
        """The run's wall time so far, in parts that add up to `total_s`."""
        now = time.perf_counter()
        parts = {"startup_s": self.loop_started - self.started}
        parts["train_s"] = now - self.loop_started - self.paused()
        parts |= {f"{k}_s": v for k, v in self.seconds.items()}
        return parts | {"total_s": now - self.started}


def _process_age() -> float | None:
    """Seconds since this process started (Linux: /proc/self/stat's start time, in clock ticks since boot)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of the line; 20th after the command
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


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
        clock: Clock,
        flops_per_sample: float,
    ):
        self.cfg, self.state, self.accelerator, self.mlog, self.clock = cfg, state, accelerator, mlog, clock
        self.num_samples = num_samples
        device = accelerator.device
        # Model FLOPs of one device's share of a sample (forward + backward), and the device's peak for MFU.
        self.flops_per_sample = training_flops(flops_per_sample) / accelerator.num_processes
        self.peak = peak_tflops(device, cfg.mixed_precision, cfg.logging.peak_tflops)
        self.loss_sum = torch.zeros((), device=accelerator.device)
        # Units the task counted itself (tokens, pixels), when it does; otherwise the loss is per sample.
        self.units: torch.Tensor | None = None
        self.metric_sums: dict[str, torch.Tensor] = {}  # the task's training metrics, summed like the loss
        self.grad_norm: torch.Tensor | None = None
        self.lrs: list[tuple[int, float]] = []  # (step, lr) of every update of the interval
        self.skipped = 0  # updates the fp16 grad scaler skipped (inf/NaN gradients) in this interval
        tensorboard = accelerator.is_main_process and "tensorboard" in cfg.logging.trackers
        self.writer = accelerator.get_tracker("tensorboard", unwrap=True) if tensorboard else None
        self.total_steps = total_steps
        # The bar redraws itself with carriage returns: on a terminal only. Captured (CI, SLURM's log files), the
        # frames would interleave with the log lines; there each logging step is one log line instead.
        self.bar = tqdm(
            total=total_steps, initial=state.step, dynamic_ncols=True, desc="train",
            disable=not (accelerator.is_main_process and cfg.logging.progress_bar and _terminal()),
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
        self.start_time, self.start_paused = time.perf_counter() if now is None else now, self.clock.paused()
        reset_peak_memory(self.accelerator.device)

    def flush(self) -> None:
        """Log the interval: the only host sync of the hot path. A non-finite loss stops the run here (unless
        --no-stop-on-nonfinite), before anything of this step is evaluated or saved."""
        state, acc, first = self.state, self.accelerator, self.start_step
        if state.samples_seen == self.start_samples:  # nothing trained since the last flush
            return
        now = time.perf_counter()
        samples = state.samples_seen - self.start_samples
        counted = None
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
            counted = counted_units if self.units is not None else None
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
        seconds = now - self.start_time - (self.clock.paused() - self.start_paused)
        values = {"train/loss": loss, **means, "train/samples_per_s": samples / seconds}
        if counted is not None:  # the units the task's loss counts: tokens for a language model
            values["train/tokens_per_s"] = units / seconds
        values["train/tflops"] = achieved_tflops(self.flops_per_sample * samples, 1, seconds)  # per device
        if self.peak is not None:
            values["train/mfu"] = values["train/tflops"] / self.peak
        values |= {f"train/{k}": v for k, v in peak_memory(self.accelerator.device).items()}
        if self.grad_norm is not None:
            values["train/grad_norm"] = local(self.grad_norm).item()
        epoch = state.epoch + state.samples_in_epoch / self.num_samples
        record = {k[6:]: v for k, v in values.items()}
        if self.peak is None:
            record["mfu"] = None  # no peak to measure against (a CPU, an unknown GPU): n/a, not a guess
        if self.lrs:
            record["lr"] = self.lrs[-1][1]
        if self.skipped:
            record["skipped_steps"] = self.skipped
            log.warning("WARNING: the fp16 grad scaler skipped %d update(s) (inf/NaN gradients) before step %d",
                        self.skipped, state.step)  # fmt: skip
        self.mlog.write("train", state.step, epoch, record)
        if self.lrs:  # the logging step's lr goes to every tracker; the others of the interval to TensorBoard
            values["train/lr"] = self.lrs[-1][1]
        if self.writer is not None and self.cfg.logging.lr_every_step:
            # Straight into the tracker's SummaryWriter: accelerator.log flushes the file on every call, which
            # would cost ~80 us for each step's lr instead of ~28.
            for step, lr in self.lrs[:-1]:
                self.writer.add_scalar("train/lr", lr, step)
        acc.log(values, step=state.step)
        shown = {
            "loss": f"{loss:.4f}",
            "lr": f"{self.lrs[-1][1]:.3g}" if self.lrs else "-",
            "samples/s": f"{values['train/samples_per_s']:.0f}",
            **({"tokens/s": f"{values['train/tokens_per_s']:.0f}"} if "train/tokens_per_s" in values else {}),
            "MFU": format_mfu(values.get("train/mfu")),
            "mem": _memory_text(values),
        }
        if self.bar.disable:
            log.info("train step %d/%d epoch %.2f: %s", state.step, self.total_steps, epoch,
                     "  ".join(f"{k} {v}" for k, v in shown.items()))  # fmt: skip
        else:
            self.bar.update(state.step - self.start_step)
            self.bar.set_postfix(shown)
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


def _terminal() -> bool:
    """Whether tqdm's stream (stderr) is a terminal."""
    return sys.stderr.isatty()


def _memory_text(values: dict[str, Any]) -> str:
    """The interval's peak memory for the progress line: the device's allocated (GPU) or the process's RSS."""
    if "train/mem_alloc_gb" in values:
        return f"{values['train/mem_alloc_gb']:.2f}GB"
    return f"{values['train/rss_peak_gb']:.2f}GB RSS"
