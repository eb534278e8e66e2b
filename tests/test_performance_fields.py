"""What every run reports about its speed (issue 16): samples/s, tokens/s, achieved TFLOP/s, MFU (n/a on a CPU),
peak memory per logging interval, in metrics.jsonl, TensorBoard and the console; and the split of the run's wall
time in the final record."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launcher.files import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
BLOCK, BATCH = 16, 8


def test_speed_fields_are_counts_over_measured_time_and_the_time_split_adds_up(tmp_path):
    cmd = [sys.executable, "-m", "launcher.train", "recipes/charlm.py", "--data.path", str(TEXT),
           "--output-dir", str(tmp_path), "--run-name", "c", "--model.layers", "1", "--model.width", "32",
           "--model.heads", "2", "--data.block-size", str(BLOCK), "--data.batch-size", str(BATCH),
           "--max-steps", "30", "--logging.every-steps", "10", "--eval-every-steps", "15",
           "--data.eval-batch-size", "512", "--data.val-fraction", "0.005"]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    records, _ = read_jsonl(tmp_path / "c" / "metrics.jsonl")
    (setup,) = [r for r in records if r["kind"] == "setup"]
    train = [r for r in records if r["kind"] == "train"]
    (final,) = [r for r in records if r["kind"] == "final"]
    assert [r["step"] for r in train] == [10, 20, 30]
    seconds = []
    for r in train:
        # Every target of a window counts: tokens = samples x block, so the two rates agree exactly.
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * BLOCK, rel=1e-9)
        # Achieved TFLOP/s: forward + backward (3x the counted forward) of the interval's samples, over its time.
        assert r["tflops"] == pytest.approx(
            3 * setup["flops_per_sample"] * r["samples_per_s"] / 1e12, rel=1e-9
        )
        assert r["mfu"] is None  # a CPU has no peak in the table: n/a, not a guess
        assert 0.05 < r["rss_peak_gb"] < 64
        seconds.append(10 * BATCH / r["samples_per_s"])  # each interval: 10 steps of BATCH samples
    time_split = final["time"]
    parts = ["startup_s", "train_s", "eval_s", "checkpoint_s"]
    assert sum(time_split[p] for p in parts) == pytest.approx(time_split["total_s"], rel=1e-9)
    assert all(time_split[p] > 0 for p in parts)
    assert time_split["total_s"] < wall  # the process's own clock, inside the test's
    # The intervals' times (samples over samples/s) are the training time outside evaluations and saves: they
    # cover it but for the logging itself and the work after the last logging step.
    assert sum(seconds) <= time_split["train_s"] and sum(seconds) == pytest.approx(
        time_split["train_s"], rel=0.15
    )

    events = EventAccumulator(str(tmp_path / "c" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("samples_per_s", "tokens_per_s", "tflops", "rss_peak_gb"):
        logged = {e.step: e.value for e in events.Scalars(f"train/{tag}")}
        assert logged == pytest.approx({r["step"]: r[tag] for r in train}, rel=1e-6), tag  # float32
    assert "train/mfu" not in events.Tags()["scalars"]
    console = (result.stdout + result.stderr).splitlines()
    lines = [line for line in console if "train step 30/30" in line]
    assert len(lines) == 1 and "tokens/s" in lines[0] and "MFU n/a" in lines[0] and "GB RSS" in lines[0]


def test_a_given_peak_gives_an_mfu(tmp_path):
    from launcher.train import main

    code = main(["recipes/tabular.py", "--data.path", str(REPO.parent / "shared" / "data" / "diabetes" / "diabetes.csv"),
                 "--output-dir", str(tmp_path), "--run-name", "t", "--max-epochs", "1", "--logging.every-steps", "6",
                 "--logging.peak-tflops", "0.5", "--logging.trackers"])  # fmt: skip
    assert code == 0
    records, _ = read_jsonl(tmp_path / "t" / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 2
    for r in train:
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5, rel=1e-12) and r["mfu"] > 0
