"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, several at once, through Accelerate's own
trackers (`Accelerator(log_with=...)`), so every `accelerator.log` reaches all of them.

Each run is named after its run directory and, in W&B and MLflow, carries the resolved config (flattened,
`optim.lr`) as its hyperparameters. A resumed run (a requeued SLURM job, a crash) continues the same W&B and
MLflow run: their ids are kept in <run>/trackers.json. Without a server, everything stays in the run directory:
`WANDB_MODE=offline` writes <run>/wandb/offline-run-*/ (`wandb sync` uploads it later), and MLflow, unless
MLFLOW_TRACKING_URI names a server, writes a file store at <run>/mlruns (`mlflow ui --backend-store-uri
<run>/mlruns` shows it).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker

from launcher.config import TrainConfig, flatten, to_dict
from launcher.errors import UserError
from launcher.files import write_json_atomic

IDS_FILE = "trackers.json"


def check_installed(names: tuple[str, ...]) -> None:
    """A tracker whose package is missing is a one-line error before anything starts, naming the extra."""
    for name in names:
        if name == "tensorboard":
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(
                f"--logging.trackers {name}: the {name} package is not installed; install the extra with "
                f"pip install -e '.[{name}]' (or drop {name} from --logging.trackers)"
            ) from None


def build(cfg: TrainConfig, run_dir: Path, project: str) -> list[GeneralTracker]:
    """The trackers of --logging.trackers, unstarted; `project` (the recipe's name) groups the runs in W&B and
    MLflow unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say otherwise."""
    check_installed(cfg.logging.trackers)
    ids = _read_ids(run_dir)
    trackers: list[GeneralTracker] = []
    for name in dict.fromkeys(cfg.logging.trackers):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", run_dir))  # event files in <run>/tensorboard
        elif name == "wandb":
            resume = {"id": ids["wandb"], "resume": "allow"} if "wandb" in ids else {}
            trackers.append(
                WandBTracker(os.environ.get("WANDB_PROJECT", project), name=run_dir.name, dir=str(run_dir),
                             **resume)
            )  # fmt: skip
        elif name == "mlflow":
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                import mlflow

                # MLflow 3 keeps the file store in maintenance mode behind this switch; it is the one store that
                # needs no server and no database packages, and it lives inside the run directory.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
            trackers.append(
                MLflowTracker(experiment_name=project, run_name=run_dir.name, run_id=ids.get("mlflow"))
            )
    return trackers


def start(accelerator: Accelerator, cfg: TrainConfig, run_dir: Path) -> None:
    """Start the trackers on the main process, store the config as hyperparameters and remember the run ids."""
    if not accelerator.is_main_process or not accelerator.log_with:
        return
    try:
        accelerator.init_trackers(run_dir.name)
    except Exception as exc:  # a tracker's login, server or network: say which and how to go on without it
        for tracker in accelerator.trackers:  # the ones that started; end_training must not finish the others
            with contextlib.suppress(Exception):
                tracker.finish()
        accelerator.trackers.clear()
        names = " ".join(cfg.logging.trackers)
        raise UserError(
            f"a tracker failed to start ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}); "
            f"trackers: {names}. For W&B run `wandb login` or set WANDB_MODE=offline; for MLflow check "
            "MLFLOW_TRACKING_URI; or drop it from --logging.trackers"
        ) from None
    hyperparameters = {k: _param(v) for k, v in flatten(to_dict(cfg)).items()}
    ids: dict[str, str] = {}
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.store_init_configuration(hyperparameters)
            ids["wandb"] = tracker.run.id
        elif tracker.name == "mlflow":
            # A resumed MLflow run already has its parameters, and MLflow refuses to change a logged one.
            if "mlflow" not in _read_ids(run_dir):
                tracker.store_init_configuration(hyperparameters)
            ids["mlflow"] = tracker.active_run.info.run_id
    if ids:
        write_json_atomic(run_dir / IDS_FILE, _read_ids(run_dir) | ids)


def _param(value: Any) -> bool | int | float | str:
    """A hyperparameter as the trackers take it: scalars as they are, anything else (tuples, None) as text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _read_ids(run_dir: Path) -> dict[str, str]:
    try:
        return json.loads((run_dir / IDS_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{run_dir / IDS_FILE} is unreadable ({exc}); delete it to start new tracker runs for this run "
            "directory"
        ) from None
