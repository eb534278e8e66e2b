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
    requeues.jsonl     every SLURM requeue decision (launcher.preemption)
    checkpoints/       resumable checkpoints (see launcher.checkpoint)
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from launcher.config import TrainConfig, save_json

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
    """Console logging on the main process (warnings only elsewhere), mirrored into <run>/train.log."""
    log.handlers.clear()
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if run_dir is not None and is_main:
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").handlers = log.handlers


class _TqdmHandler(logging.Handler):
    """Prints through tqdm.write, so log lines appear above the progress bar instead of inside it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:
            self.handleError(record)


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


class MetricsLog:
    """Appends one JSON object per event to <run>/metrics.jsonl (main process only; a no-op elsewhere)."""

    def __init__(self, path: Path | None) -> None:
        self.file = open(path, "a", buffering=1) if path is not None else None  # noqa: SIM115

    def write(self, kind: str, step: int, epoch: float, values: dict[str, Any]) -> None:
        if self.file is not None:
            record = {"kind": kind, "step": step, "epoch": round(epoch, 4), **values}
            self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
