"""Stop requests from signals: SLURM's warning signal before the time limit (USR1) and SIGTERM.

The handler only sets a flag (no I/O: it may interrupt anything). The training loop asks `stop_agreed` at step
boundaries; the ranks agree through an all-reduce, so they all save the same step and stop together.
"""

from __future__ import annotations

import signal
from typing import Any

import torch

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EXIT_PREEMPTED = (
    3  # exit status of a run that saved and stopped on a signal (distinct from success and errors)
)
_received: list[int] = []


def _handler(signum: int, frame: Any) -> None:
    _received.append(signum)


def install() -> None:
    """Route the stop signals to the flag (main thread only; a no-op elsewhere)."""
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _handler)
    except ValueError:  # not the main thread (e.g. inside some test runners)
        pass


def requested() -> bool:
    return bool(_received)


def stop_agreed(accelerator: Any) -> bool:
    """True on every rank when any rank received a stop signal. One process: no communication at all."""
    if accelerator.num_processes == 1:
        return requested()
    flag = torch.tensor([int(requested())], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item())
