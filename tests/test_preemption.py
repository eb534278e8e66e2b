"""Preemption: when the ranks agree on a stop, the requeue decision and its log, and a real signal to a real
training process (one process, a stub scontrol on PATH, no cluster): it saves, requeues the array task and exits
with EXIT_PREEMPTED."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from launcher.cluster import preemption
from launcher.config import PreemptionConfig

REPO = Path(__file__).resolve().parents[1]
MNIST_MINI = REPO.parent / "shared" / "data" / "mnist-mini"


@pytest.fixture(autouse=True)
def no_pending_signal():
    preemption._received.clear()
    yield
    preemption._received.clear()


def test_one_process_checks_every_step_several_every_k_steps() -> None:
    assert all(preemption.is_check_step(step, 1, 10) for step in range(1, 25))
    assert [s for s in range(1, 25) if preemption.is_check_step(s, 2, 10)] == [10, 20]
    assert all(preemption.is_check_step(step, 8, 1) for step in range(1, 5))


class FakeAccelerator:
    """Counts the all-reduces `stop_agreed` does; `others` is the flag the other ranks contribute."""

    def __init__(self, num_processes: int, others: int = 0) -> None:
        self.num_processes, self.device, self.others, self.reductions = (
            num_processes,
            torch.device("cpu"),
            others,
            0,
        )

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        self.reductions += 1
        return tensor + self.others


def test_stop_agreed_communicates_only_at_check_steps() -> None:
    acc = FakeAccelerator(2, others=1)  # another rank got the signal, this one did not
    assert [preemption.stop_agreed(acc, step, 4) for step in (1, 2, 3, 4)] == [False, False, False, True]
    assert acc.reductions == 1
    single = FakeAccelerator(1)
    assert not preemption.stop_agreed(single, 7, 4)
    preemption._handler(signal.SIGTERM, None)
    assert preemption.stop_agreed(single, 7, 4) and single.reductions == 0
    assert preemption.received() == "SIGTERM"


class FakeScontrol:
    """Stands in for `scontrol`: records calls, reports `state` for `show job`, fails requeues if told to."""

    def __init__(self, state: str = "RUNNING", fail: str = "") -> None:
        self.calls: list[list[str]] = []
        self.state, self.fail = state, fail

    def __call__(self, args: list[str]) -> subprocess.CompletedProcess:
        self.calls.append(args)
        if args[0] == "show":
            return subprocess.CompletedProcess(
                args, 0, f"JobId=5 JobName=train JobState={self.state} Reason=None\n", ""
            )
        if self.fail:
            return subprocess.CompletedProcess(args, 1, "", self.fail)
        return subprocess.CompletedProcess(args, 0, "", "")


def _requeue(tmp_path: Path, scontrol: FakeScontrol, env: dict[str, str], **cfg) -> dict | None:
    return preemption.requeue(tmp_path, 40, PreemptionConfig(**cfg), "SIGUSR1", env=env, scontrol=scontrol)


def test_requeue_names_the_array_task_and_logs_every_attempt(tmp_path: Path) -> None:
    env = {
        "SLURM_JOB_ID": "907",
        "SLURM_ARRAY_JOB_ID": "900",
        "SLURM_ARRAY_TASK_ID": "7",
        "SLURM_RESTART_COUNT": "2",
    }
    scontrol = FakeScontrol()
    record = _requeue(tmp_path, scontrol, env)
    assert ["requeue", "900_7"] in scontrol.calls
    assert record == json.loads((tmp_path / "requeues.jsonl").read_text())
    assert record["job"] == "900_7" and record["requeued"] and record["step"] == 40
    assert record["signal"] == "SIGUSR1" and record["restart_count"] == 2


def test_requeues_stop_at_the_cap_and_count_per_job(tmp_path: Path) -> None:
    scontrol = FakeScontrol()
    for _ in range(3):
        _requeue(tmp_path, scontrol, {"SLURM_JOB_ID": "5"}, max_requeues=2)
    records = preemption.read_requeues(tmp_path)
    assert [r["requeued"] for r in records] == [True, True, False]
    assert "requeued 2 times already (--preemption.max-requeues 2)" in records[2]["reason"]
    assert sum(call[0] == "requeue" for call in scontrol.calls) == 2
    # A new job reusing the run directory (--run-name) has a cap of its own.
    assert _requeue(tmp_path, scontrol, {"SLURM_JOB_ID": "6"}, max_requeues=2)["requeued"]


def test_no_requeue_when_cancelled_off_failed_or_outside_slurm(tmp_path: Path) -> None:
    # scancel's SIGTERM finds the job COMPLETING; `scontrol requeue` would bring it back to life.
    cancelled = FakeScontrol(state="COMPLETING")
    record = _requeue(tmp_path, cancelled, {"SLURM_JOB_ID": "5"})
    assert not record["requeued"] and "SLURM is ending the job (JobState=COMPLETING" in record["reason"]
    assert not any(call[0] == "requeue" for call in cancelled.calls)

    off = _requeue(tmp_path, FakeScontrol(), {"SLURM_JOB_ID": "5"}, requeue=False)
    assert not off["requeued"] and "--preemption.no-requeue" in off["reason"]

    failing = FakeScontrol(fail="Requested operation is presently disabled for job 5")
    failed = _requeue(tmp_path, failing, {"SLURM_JOB_ID": "5"})
    assert not failed["requeued"] and "presently disabled" in failed["reason"]

    assert _requeue(tmp_path, FakeScontrol(), {}) is None
    assert len(preemption.read_requeues(tmp_path)) == 3


def test_requeue_after_save_requeues_on_the_main_process_only_and_waits(tmp_path: Path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(preemption, "requeue", lambda *args: calls.append(args))
    worker = SimpleNamespace(is_main_process=False, wait_for_everyone=lambda: calls.append("barrier"))
    preemption.requeue_after_save(worker, tmp_path, 3, PreemptionConfig())
    assert calls == ["barrier"]
    main = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: calls.append("barrier"))
    preemption.requeue_after_save(main, tmp_path, 3, PreemptionConfig())
    assert calls[1][0] == tmp_path and calls[2] == "barrier"


@pytest.mark.slow
def test_usr1_saves_requeues_the_array_task_and_exits_3(tmp_path: Path) -> None:
    """A real trainer process under fake SLURM variables: the signal arrives mid-run; `scontrol` is a stub."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "scontrol-calls"
    (stubs / "scontrol").write_text(f'#!/bin/bash\necho "$*" >> {calls}\necho "JobId=1 JobState=RUNNING"\n')
    (stubs / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env |= {
        "PATH": f"{stubs}:{env['PATH']}",
        "SLURM_JOB_ID": "1234",
        "SLURM_ARRAY_JOB_ID": "1230",
        "SLURM_ARRAY_TASK_ID": "4",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "launcher.train", str(REPO / "recipes" / "mnist.py")]
    cmd += ["--data.root", str(MNIST_MINI), "--output-dir", str(tmp_path / "runs"), "--max-steps", "2000"]
    cmd += ["--logging.every-steps", "2", "--logging.no-progress-bar", "--logging.trackers"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "runs" / "mnist-1230_4"  # the array task's run directory
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == preemption.EXIT_PREEMPTED, out[-3000:]
    (record,) = preemption.read_requeues(run_dir)
    assert record["job"] == "1230_4" and record["requeued"] and record["signal"] == "SIGUSR1"
    assert "requeue 1230_4" in calls.read_text().splitlines()
    assert (run_dir / "checkpoints" / f"step-{record['step']:08d}" / "COMPLETE").is_file()
    assert 2 <= record["step"] < 2000
