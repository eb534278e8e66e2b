"""The run directory: provenance, the console log, and metrics.jsonl. Only the main process writes here.

<output_dir>/<run_name>/
    config.json        the resolved config; `--config config.json` feeds it back
    command.txt        the command line of every start of this run (one line each)
    env.json           package versions, git commit, host, processes
    train.log          everything printed to the console
    metrics.jsonl      one JSON object per logged event: {"step", "epoch", "kind", metric: value, ...}
    tensorboard/       event files (Accelerate's TensorBoard tracker)
    best.safetensors   the weights with the best key metric so far (clean keys)
    ema.safetensors    the final moving average of the weights (with --ema.decay)
    requeues.jsonl     every SLURM requeue decision (launcher.cluster.preemption)
    checkpoints/       resumable checkpoints (see launcher.checkpoint)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from launcher.config import TrainConfig, save_json
from launcher.errors import UserError

log = logging.getLogger("launcher")


def default_run_name(recipe_name: str) -> str:
    """<recipe>-<job id> under SLURM (so a requeued job finds its directory), else <recipe>-<date-time>."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{recipe_name}-{array_job}_{array_task}"
    if job := os.environ.get("SLURM_JOB_ID"):
        return f"{recipe_name}-{job}"
    return f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def setup_console(run_dir: Path | None, is_main: bool) -> None:
    """Console logging on the main process (warnings only elsewhere), mirrored into <run>/train.log. Inside
    `console()`, console lines are printed above the progress bar rather than into it."""
    log.handlers.clear()
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    stdout = logging.StreamHandler(sys.stdout)
    stdout.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(stdout)
    if run_dir is not None and is_main:
        file = _LogFile(run_dir / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").handlers = log.handlers


class _LogFile(logging.FileHandler):
    """train.log. When it cannot be written any more (disk full, file made read-only), the console says so once
    and keeps everything; training goes on, instead of logging's own traceback on every line that follows."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        self.failed = True  # also while `console()` has the handlers swapped, and after it puts them back
        log.removeHandler(self)
        logging.getLogger("py.warnings").removeHandler(self)
        with contextlib.suppress(OSError):
            self.close()
        log.warning("WARNING: cannot write %s (%s); logging to the console only from now on", self.baseFilename,
                    getattr(error, "strerror", None) or error)  # fmt: skip


def close_log_file() -> None:
    """Stop writing train.log (its run directory is about to be removed)."""
    for handler in [h for h in log.handlers if isinstance(h, _LogFile)]:
        log.removeHandler(handler)
        handler.close()


def record_error(message: str) -> None:
    """Append an error to train.log only (the CLI prints it on the console)."""
    for handler in log.handlers:
        if isinstance(handler, _LogFile):
            handler.handle(
                log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (message,), None)
            )


@contextlib.contextmanager
def console() -> Iterator[None]:
    """Log lines through tqdm.write while a progress bar may be shown, so that they appear above it instead of
    inside it (tqdm's own `logging_redirect_tqdm`, on the launcher's logger and the warnings it captures)."""
    with logging_redirect_tqdm([log, logging.getLogger("py.warnings")]):
        yield


def write_provenance(run_dir: Path, cfg: TrainConfig, world_size: int, recipe_path: Path) -> None:
    save_json(cfg, run_dir / "config.json")
    command = shlex.join([Path(sys.executable).name, *sys.orig_argv[1:]]) if hasattr(sys, "orig_argv") else ""
    with open(run_dir / "command.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {command}\n")
    env = {
        "python": platform.python_version(),
        "host": platform.node(),
        "processes": world_size,
        "recipe": str(recipe_path),
        "git_commit": _git_commit(recipe_path.parent),
        "packages": {
            p: _version(p) for p in ("torch", "torchvision", "accelerate", "safetensors", "tyro", "launcher")
        },
    }
    (run_dir / "env.json").write_text(json.dumps(env, indent=2) + "\n")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit(folder: Path) -> str | None:
    """The commit checked out where the recipe lives, with `+dirty` when files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=folder
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=folder,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _json_safe(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None (JSON has no such numbers: `json.dumps` would write the
    bare words NaN and Infinity, which strict readers such as jq and JavaScript reject)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class MetricsLog:
    """Appends one JSON object per event to <run>/metrics.jsonl (main process only; a no-op elsewhere).

    Non-finite numbers (a diverged loss) are written as null; train.log and TensorBoard keep the NaN itself."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.file = open(path, "a", buffering=1) if path is not None else None  # noqa: SIM115

    def write(self, kind: str, step: int, epoch: float, values: dict[str, Any]) -> None:
        if self.file is not None:
            record = {"kind": kind, "step": step, "epoch": round(epoch, 4), **values}
            try:
                self.file.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
            except OSError as exc:
                raise UserError(
                    f"cannot write {self.path} ({exc.strerror or exc}); free disk space or fix the run "
                    "directory's permissions, then rerun the same command to resume from the last checkpoint"
                ) from None

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):  # what could not be written was reported by write()
                self.file.close()
            self.file = None
