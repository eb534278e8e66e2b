"""Stop requests from signals (SLURM's warning signal USR1 before the time limit, and SIGTERM), and the requeue.

The handler only records the signal (no I/O: it may interrupt anything, even a write). The training loop asks
`stop_agreed` at step boundaries; the ranks agree through an all-reduce, so they all save the same step and stop
together. After the save, `requeue_after_save` has the main process requeue the SLURM job (at most
`max_requeues` times per job, each attempt a line of <run>/requeues.jsonl) and the trainer exits with
EXIT_PREEMPTED. The requeued job keeps its job id, so it finds the same run directory and resumes. A job that
SLURM is already ending (scancel, the time limit, preemption: JobState=COMPLETING when its SIGTERM arrives) saves
but is not requeued, so that a cancelled job stays cancelled.

How often to agree: under several processes, agreeing costs an all-reduce and a host sync (`.item()`), which on a
GPU drains the queue of launched kernels and stalls the next step's launches. `check_every_steps` (default 10)
spreads that cost over as many steps; the price is that a stop waits for up to that many steps, which must fit,
together with the save, into the warning time (`--signal=USR1@90`: 90 s). One process checks every step: it is a
read of a Python list.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from launcher.files import read_jsonl

if TYPE_CHECKING:
    from launcher.config import PreemptionConfig

log = logging.getLogger("launcher")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
EXIT_PREEMPTED = 3
"""Exit status of a run that saved and stopped on a signal (distinct from success, 0, and user errors, 2)."""
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT, as shells report it), whether the run saved first or not."""
REQUEUE_LOG = "requeues.jsonl"
_received: list[int] = []
_previous: dict[int, Any] = {}


def _handler(signum: int, frame: Any) -> None:
    # Python runs this in the main thread between two bytecodes, never inside a C-level write; still, it only
    # records the signal and says what will happen, and the loop does the rest at the next step boundary.
    if signum == signal.SIGINT and signal.SIGINT in _received:
        os.write(2, b"\ninterrupted again: exiting now, without saving this step\n")
        os._exit(EXIT_INTERRUPTED)  # the last committed checkpoint stays valid: commits are atomic
    _received.append(signum)
    if signum == signal.SIGINT:
        os.write(
            2,
            b"\ninterrupted: saving a checkpoint after this step, then stopping (Ctrl-C again to exit now)\n",
        )


def install() -> None:
    """Route the stop signals to the flag (main thread only; a no-op elsewhere), for a run that starts afresh:
    a signal that stopped an earlier run in this process (tests, sweeps in one process) does not stop this one.
    Ctrl-C (SIGINT) stops like SIGTERM (save, then exit); a second Ctrl-C exits at once. `uninstall` puts the
    previous handlers back."""
    _received.clear()
    try:
        for sig in STOP_SIGNALS:
            _previous.setdefault(sig, signal.signal(sig, _handler))
    except ValueError:  # not the main thread (e.g. inside some test runners)
        pass


def uninstall() -> None:
    """The handlers from before `install` (Ctrl-C interrupts again once the training loop is over)."""
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()


def requested() -> bool:
    return bool(_received)


def received() -> str | None:
    """The name of the first stop signal received (SIGUSR1, SIGTERM, SIGINT), or None."""
    return signal.Signals(_received[0]).name if _received else None


def is_check_step(step: int, num_processes: int, every_steps: int) -> bool:
    """Whether the ranks agree on a stop at this step boundary: every step for one process (free), every
    `every_steps` steps under several (the same steps on every rank, so all of them join the all-reduce)."""
    return num_processes == 1 or every_steps <= 1 or step % every_steps == 0


def stop_agreed(accelerator: Any, step: int = 0, every_steps: int = 1) -> bool:
    """True on every rank when any rank received a stop signal, asked at the steps `is_check_step` picks.
    One process: no communication at all."""
    if accelerator.num_processes == 1:
        return requested()
    if not is_check_step(step, accelerator.num_processes, every_steps):
        return False
    flag = torch.tensor([int(requested())], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item())


# ---- requeue ---------------------------------------------------------------------------------------------------
def slurm_job(env: Mapping[str, str]) -> str | None:
    """The id `scontrol requeue` takes for this job: ARRAYJOB_TASK for an array task, else the job id."""
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return env.get("SLURM_JOB_ID") or None


def read_requeues(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / REQUEUE_LOG
    if not path.is_file():
        return []
    records, _ = read_jsonl(path)  # a line cut short by a killed process is skipped
    return records


Runner = Callable[[list[str]], subprocess.CompletedProcess]


def _scontrol(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)


def _job_state(job: str, scontrol: Runner) -> str | None:
    try:
        out = scontrol(["show", "job", "--oneliner", job])
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"\bJobState=(\S+)", out.stdout or "")
    return found.group(1) if found else None


def requeue(
    run_dir: Path,
    step: int,
    cfg: PreemptionConfig,
    signal_name: str | None,
    env: Mapping[str, str] = os.environ,
    scontrol: Runner = _scontrol,
) -> dict[str, Any] | None:
    """Requeue this SLURM job once, unless that is off, capped or unwanted; record the decision in
    <run>/requeues.jsonl and return the record (None outside SLURM, where there is nothing to requeue)."""
    job = slurm_job(env)
    if job is None:
        log.info("not a SLURM job: nothing requeued")
        return None
    done = sum(1 for r in read_requeues(run_dir) if r.get("job") == job and r.get("requeued"))
    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "job": job,
        "step": step,
        "signal": signal_name,
        "restart_count": int(env.get("SLURM_RESTART_COUNT") or 0),
        "requeued": False,
    }
    if not cfg.requeue:
        record["reason"] = "requeue is off (--preemption.no-requeue)"
    elif done >= cfg.max_requeues:
        record["reason"] = f"requeued {done} times already (--preemption.max-requeues {cfg.max_requeues})"
    elif (state := _job_state(job, scontrol)) not in (None, "RUNNING"):
        # SLURM itself is ending the job (JobState=COMPLETING, whether by scancel, the time limit or preemption),
        # and from inside the job these look alike. `scontrol requeue` would bring a cancelled job back to life,
        # so the job stays ended: SLURM requeues preempted jobs itself (PreemptMode=REQUEUE with --requeue), and
        # the warning signal before the time limit (USR1, while the job still runs) is what requeues on time.
        record["reason"] = f"SLURM is ending the job (JobState={state}: scancel, time limit or preemption)"
    else:
        try:
            result = scontrol(["requeue", job])
            ok, detail = result.returncode == 0, (result.stderr or result.stdout or "").strip()
        except (OSError, subprocess.SubprocessError) as exc:
            ok, detail = False, str(exc)
        record["requeued"] = ok
        if not ok:
            record["reason"] = f"scontrol requeue {job} failed: {detail}"
    with open(Path(run_dir) / REQUEUE_LOG, "a") as f:
        f.write(json.dumps(record) + "\n")
    if record["requeued"]:
        log.info("requeued SLURM job %s (requeue %d of at most %d)", job, done + 1, cfg.max_requeues)
    else:
        log.warning("WARNING: SLURM job %s not requeued: %s", job, record["reason"])
    return record


def requeue_after_save(accelerator: Any, run_dir: Path, step: int, cfg: PreemptionConfig) -> None:
    """After the stop checkpoint: the main process requeues the job, unless the stop was its own Ctrl-C (the
    user's stop, never undone by a requeue); every rank waits for that before exiting."""
    if accelerator.is_main_process and received() != "SIGINT":
        requeue(run_dir, step, cfg, received())
    # `srun --kill-on-bad-exit` ends the whole step when a node's processes exit with status 3; without this
    # barrier a node that finished its part of the save first could kill the main process before it requeues.
    accelerator.wait_for_everyone()
