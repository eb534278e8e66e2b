"""Experiment trackers, several at once, read back by their own libraries: TensorBoard's EventAccumulator, W&B's
own reader of an offline run (`wandb leet inspect --json`), MLflow's `MlflowClient.get_metric_history`; and a
resumed run continuing the same W&B and MLflow runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.files import read_jsonl

REPO = Path(__file__).resolve().parents[1]
DIABETES = REPO.parent / "shared" / "data" / "diabetes" / "diabetes.csv"
WANDB = Path(sys.executable).with_name("wandb")


def _train(out: Path, epochs: int, *trackers: str) -> None:
    cmd = [sys.executable, "-m", "launcher.train", "recipes/tabular.py", "--data.path", DIABETES,
           "--output-dir", out, "--run-name", "t", "--max-epochs", epochs, "--logging.no-progress-bar",
           "--logging.trackers", *trackers]  # fmt: skip
    # Offline W&B, its settings and caches in the test's folder; MLflow in the run directory (no tracking URI).
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HOME": str(out / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _wandb_records(run_dir: Path) -> list[dict]:
    """Every record of every offline W&B run under the run directory, in order, through W&B's own reader."""
    records = []
    for run_file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        shown = subprocess.run([str(WANDB), "leet", "inspect", "--json", str(run_file)], capture_output=True,
                               text=True, timeout=120, check=True)  # fmt: skip
        records += [json.loads(line) for line in shown.stdout.splitlines() if line.startswith("{")]
    return records


@pytest.mark.slow
def test_tensorboard_wandb_and_mlflow_hold_the_runs_metrics_and_config_and_a_resume_continues_them(
    tmp_path, monkeypatch
):
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    reader = subprocess.run([str(WANDB), "leet", "inspect", "--help"], capture_output=True, timeout=120)
    if reader.returncode != 0:  # wandb's offline-run reader is new in 0.31; the extra's floor is older
        pytest.skip(
            "this wandb has no `wandb leet inspect`, the reader of offline runs this test uses (0.31+)"
        )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path, 2, "tensorboard", "wandb", "mlflow")
    _train(tmp_path, 3, "tensorboard", "wandb", "mlflow")  # resumes from the epoch-2 checkpoint
    run_dir = tmp_path / "t"
    records, _ = read_jsonl(run_dir / "metrics.jsonl")
    r2 = {r["step"]: r["r2"] for r in records if r["kind"] == "eval"}
    loss = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    lr = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    assert sorted(r2) == [12, 24, 36]  # 12 steps per epoch, 3 epochs over two starts
    config = json.loads((run_dir / "config.json").read_text())

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("eval/r2")} == pytest.approx(r2, rel=1e-6)  # float32

    history: dict[str, dict[int, float]] = {}
    wandb_runs = [r["run"] for r in _wandb_records(run_dir) if r["type"] == "run"]
    wandb_config: dict = {}
    for record in _wandb_records(run_dir):
        if record["type"] == "history":
            item = record["history"]["item"]
            for key, value in item.items():
                history.setdefault(key, {})[item["_step"]] = value
        elif record["type"] == "config":
            wandb_config |= record["config"]["update"]
    assert history["eval/r2"] == r2  # doubles, exactly
    assert history["train/loss"] == loss
    assert history["train/lr"] == lr
    assert len(wandb_runs) == 2 and len({r["run_id"] for r in wandb_runs}) == 1  # one W&B run, resumed
    assert {r["display_name"] for r in wandb_runs} == {"t"} and wandb_runs[0]["project"] == "tabular"
    assert wandb_config["optim.lr"] == config["optim"]["lr"]
    assert wandb_config["data.path"] == str(DIABETES)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store behind this switch
    client = mlflow.MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "tabular"]
    (run,) = client.search_runs([experiment.experiment_id])  # one MLflow run, resumed
    assert run.info.run_name == "t"
    assert run.data.params["optim.lr"] == str(config["optim"]["lr"])
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/r2")} == r2
    assert json.loads((run_dir / "trackers.json").read_text()) == {
        "wandb": wandb_runs[0]["run_id"], "mlflow": run.info.run_id
    }  # fmt: skip


@pytest.mark.parametrize("extra", ["wandb", "mlflow"])
def test_a_tracker_without_its_package_is_a_one_line_error_naming_the_extra(
    tmp_path, capsys, monkeypatch, extra
):
    from launcher.train import main

    monkeypatch.setitem(sys.modules, extra, None)  # what `import` does for a package that is not installed
    code = main(["recipes/tabular.py", "--data.path", str(DIABETES), "--output-dir", str(tmp_path),
                 "--run-name", "t", "--logging.trackers", "tensorboard", extra])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (
        f"error: --logging.trackers {extra}: the {extra} package is not installed; install the extra with "
        f"pip install -e '.[{extra}]' (or drop {extra} from --logging.trackers)"
    )
    assert not (tmp_path / "t").exists()  # a start that failed leaves no run directory


def test_a_tracker_that_cannot_start_is_a_one_line_error_and_leaves_no_run_directory(tmp_path):
    pytest.importorskip("wandb")
    env = {**os.environ, "WANDB_MODE": "online", "HOME": str(tmp_path / "home")}
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, "-m", "launcher.train", "recipes/tabular.py", "--data.path", str(DIABETES),
           "--output-dir", str(tmp_path), "--run-name", "t", "--logging.trackers", "wandb"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "wandb login" in line and "WANDB_MODE=offline" in line
    assert not (tmp_path / "t").exists()
