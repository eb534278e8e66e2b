"""Exact resume: N steps straight == k steps + SIGKILL + resume, bit for bit on CPU fp32; across world sizes.

The interrupted runs are real processes killed with SIGKILL right after a checkpoint commits (where the save
pauses for the kill, through the checkpointer's test hook); the resumed run is the same command again
(`--resume auto`, the default). Other moments of a crash, inside a save, are tests/test_checkpoint_faults.py's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    REPO,
    TEST_RECIPES,
    accelerate_cmd,
    accelerate_launch,
    assert_same_tensors,
    final_weights,
    kill_tree,
    metrics,
    train,
)

pytestmark = pytest.mark.slow
MNIST = REPO / "recipes" / "mnist.py"
MLP = TEST_RECIPES / "mlp.py"


def kill_after_checkpoint(cmd: list[str], run_dir: Path, step: int, env: dict | None = None) -> None:
    """Start `cmd` and SIGKILL it, with every process below it, right after checkpoint `step` has committed: the
    save pauses there (the test hook LAUNCHER_TEST_PAUSE_AT, once `latest` points at it), so no timing can let the
    run go past it or finish first."""
    marker = run_dir.parent / f"{run_dir.name}-paused.json"
    hook = {"LAUNCHER_TEST_PAUSE_AT": f"before-rotate@{step}", "LAUNCHER_TEST_PAUSE_MARKER": str(marker)}
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **(env or {}), **hook},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before checkpoint {step}: {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            kill_tree(proc.pid)
            raise AssertionError("timed out waiting for the checkpoint")
        time.sleep(0.01)
    kill_tree(proc.pid)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / f"step-{step:08d}" / "COMPLETE").is_file()


def losses(run_dir: Path) -> dict[int, float]:
    """step -> logged training loss; a step logged twice (before a kill and after the resume) keeps the last."""
    return {r["step"]: r["loss"] for r in metrics(run_dir, "train")}


def final_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step-*"))[-1]


def assert_same_optimizer(a: Path, b: Path) -> None:
    sa = torch.load(a / "optimizer.pt", weights_only=True)
    sb = torch.load(b / "optimizer.pt", weights_only=True)
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for key, value in sa["state"][i].items():
            assert (
                torch.equal(value, sb["state"][i][key])
                if torch.is_tensor(value)
                else value == sb["state"][i][key]
            )


@pytest.mark.parametrize(
    ("label", "steps", "extra", "kills"),
    [
        # The MNIST recipe (narrowed, for time): batch-norm, dropout (RNG), random-crop augmentation, in-memory
        # data; 62 steps per epoch, so one kill lands in each epoch.
        ("in-memory", 80, ["--data.batch-size", "128"], [20, 70]),
        # Accumulation windows of 3 (the kill lands mid-window); the DataLoader path with a worker process; 42 steps
        # per epoch, so the resumed run crosses the epoch boundary.
        (
            "loader+accum",
            50,
            [
                "--data.batch-size",
                "64",
                "--grad-accum-steps",
                "3",
                "--data.no-in-memory",
                "--data.num-workers",
                "1",
            ],
            [30],
        ),
    ],
)
def test_killed_and_resumed_equals_straight(tmp_path, mnist_root, label, steps, extra, kills):
    common = [
        "--data.root",
        str(mnist_root),
        "--output-dir",
        str(tmp_path),
        "--max-steps",
        str(steps),
        "--checkpoint.every-steps",
        "10",
        "--checkpoint.keep-last",
        "10",
        "--logging.every-steps",
        "5",
        "--logging.no-progress-bar",
        "--model.channels",
        "8",
        "--model.hidden",
        "32",
        *extra,
    ]
    assert train(MNIST, *common, "--run-name", "straight") == 0
    straight = tmp_path / "straight"
    for k in kills:
        cmd = [sys.executable, "-m", "launcher.train", str(MNIST), *common, "--run-name", f"killed{k}"]
        kill_after_checkpoint(cmd, tmp_path / f"killed{k}", k)
        resumed = tmp_path / f"killed{k}"
        assert train(MNIST, *common, "--run-name", f"killed{k}") == 0
        setup = metrics(resumed, "setup")
        assert len(setup) == 2 and setup[1]["resumed_from"] is not None, setup
        assert_same_tensors(final_weights(straight), final_weights(resumed))
        assert_same_optimizer(final_checkpoint(straight), final_checkpoint(resumed))
        assert losses(resumed) == losses(straight)
        assert metrics(resumed, "final")[-1]["accuracy"] == metrics(straight, "final")[-1]["accuracy"]


def test_checkpoint_of_two_processes_resumes_on_one_and_back(tmp_path, mnist_root):
    """The data position maps by samples seen: 2 x 32 and 1 x 64 have the same global batch and sample order."""

    def args(name: str, batch: int) -> list:
        return [
            MLP,
            "--data.root",
            mnist_root,
            "--output-dir",
            tmp_path,
            "--run-name",
            name,
            "--max-steps",
            "60",
            "--checkpoint.every-steps",
            "20",
            "--logging.no-progress-bar",
            "--data.batch-size",
            str(batch),
        ]

    assert train(*args("straight", 64)) == 0  # one process, in this one (as accelerate launch would run it)
    # 2 processes killed after step 20, resumed on 1 process.
    cmd = accelerate_cmd(2, *args("two-to-one", 32))
    kill_after_checkpoint(cmd, tmp_path / "two-to-one", 20, env={"ACCELERATE_USE_CPU": "1"})
    assert train(*args("two-to-one", 64)) == 0
    # 1 process stopped after step 20, resumed on 2 processes.
    cmd = [sys.executable, "-m", "launcher.train", *map(str, args("one-to-two", 64))]
    kill_after_checkpoint(cmd, tmp_path / "one-to-two", 20)
    accelerate_launch(2, *args("one-to-two", 32))
    for name in ("two-to-one", "one-to-two"):
        assert_same_tensors(final_weights(tmp_path / "straight"), final_weights(tmp_path / name), atol=2e-6)
        resumed = metrics(tmp_path / name, "setup")[-1]
        assert resumed["resumed_from"] is not None and resumed["global_batch"] == 64


def test_resume_that_changes_the_global_batch_is_refused(tmp_path, mnist_root, capsys):
    args = [
        MLP,
        "--data.root",
        mnist_root,
        "--output-dir",
        tmp_path,
        "--run-name",
        "r",
        "--max-steps",
        "10",
        "--logging.no-progress-bar",
    ]
    assert train(*args) == 0
    assert train(*args, "--data.batch-size", "16", "--max-steps", "20") == 2
    err = capsys.readouterr().err
    assert "global_batch 32 -> 16" in err and "--allow-resume-changes" in err
    assert train(*args, "--model.hidden", "32", "--max-steps", "20") == 2
    assert "model parameters differ" in capsys.readouterr().err
    assert train(*args, "--data.batch-size", "16", "--max-steps", "20", "--allow-resume-changes") == 0
    assert metrics(tmp_path / "r", "final")[-1]["step"] == 20
