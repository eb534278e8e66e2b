"""--parallel.strategy fsdp on 2 real gloo processes (FSDP2 `fully_shard`, sharded checkpoints through
torch.distributed.checkpoint): the same training as one process with the whole batch, checkpoints that resume on
another number of processes and across strategies, export without a process group, and damaged shards caught.

Tolerance: FSDP reduce-scatters gradients (a sum, then a division) where one process sums its batch directly; over
6 AdamW steps the weights differ by at most 7.5e-9 here, so the tests allow 1e-6."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from conftest import REPO, accelerate_cmd, accelerate_launch, kill_tree, metrics, train
from launcher import checkpoint as ckpt
from launcher.checkpoint.weights import read_weights
from launcher.errors import CheckpointError
from launcher.tools.cli import main as launcher_main

RECIPE = REPO / "recipes" / "charlm.py"
TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def _args(out: Path, name: str, *extra: str | Path, eval_every: int = 0) -> list[str | Path]:
    return [RECIPE, "--data.path", TEXT, "--output-dir", out, "--run-name", name, "--logging.no-progress-bar",
            "--model.layers", "2", "--model.width", "32", "--model.heads", "2", "--data.block-size", "16",
            "--max-steps", "6", "--eval-every-steps", str(eval_every), "--checkpoint.every-steps", "3",
            "--checkpoint.keep-last", "5", "--logging.every-steps", "1", *extra]  # fmt: skip


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run, "train")]


@pytest.fixture
def accelerator_for_checks() -> Iterator[Accelerator]:
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One process with the whole batch (DDP strategy, whole checkpoints); two FSDP processes with half of it.
    Both evaluate every 2 steps: under FSDP an evaluation is collective (its forwards gather parameters), in the
    middle of training, on shares of 3,486 and 3,485 windows."""
    out = tmp_path_factory.mktemp("fsdp")
    assert train(*_args(out, "one", "--data.batch-size", "12", eval_every=2)) == 0
    accelerate_launch(
        2, *_args(out, "two", "--data.batch-size", "6", "--parallel.strategy", "fsdp", eval_every=2)
    )
    return out


@pytest.mark.slow
def test_two_sharded_processes_train_as_one_and_export_a_clean_state_dict(runs, tmp_path, capsys):
    step6 = runs / "two" / "checkpoints" / "step-00000006"
    assert sorted(p.name for p in step6.iterdir()) == [
        ".metadata", "COMPLETE", "__0_0.distcp", "__1_0.distcp", "rng-00000.pt", "rng-00001.pt", "state.json"
    ]  # fmt: skip
    assert _losses(runs / "two") == pytest.approx(_losses(runs / "one"), rel=1e-6)
    evals = [[r["loss"] for r in metrics(runs / name, "eval")] for name in ("one", "two")]
    assert len(evals[0]) == 3 and evals[1] == pytest.approx(evals[0], rel=1e-6)
    out = tmp_path / "model.safetensors"
    assert launcher_main(["convert-ckpt", str(step6), "-o", str(out)]) == 0  # no process group here
    exported = read_weights(
        out
    )  # tied to the token embedding, head.weight is stored once, loaded under both names
    assert "head.weight" in exported and load_file(out).keys() == exported.keys() - {"head.weight"}
    _close(exported, read_weights(runs / "one" / "checkpoints" / "step-00000006"))
    # The sharded checkpoint is also accepted as --weights by the test phase: the same evaluation.
    args = [RECIPE, "--data.path", TEXT, "--output-dir", tmp_path, "--run-name", "t", "--logging.no-progress-bar",
            "--phase", "test", "--weights", step6, "--model.layers", "2", "--model.width", "32", "--model.heads",
            "2", "--data.block-size", "16"]  # fmt: skip
    assert train(*args) == 0
    tested = metrics(tmp_path / "t", "test")[0]
    assert tested["loss"] == pytest.approx(metrics(runs / "one", "final")[0]["loss"], rel=1e-6)


@pytest.mark.slow
def test_sharded_and_whole_checkpoints_resume_on_another_process_count_and_strategy(runs):
    """2 FSDP processes -> 1 process (FSDP -> DDP), and 1 process -> 2 FSDP processes (DDP -> FSDP, with 2-step
    accumulation: the same global batch), each from step 3 to 6, end where the uninterrupted single process ends."""
    two3 = runs / "two" / "checkpoints" / "step-00000003"
    one3 = runs / "one" / "checkpoints" / "step-00000003"
    assert train(*_args(runs, "two-to-one", "--data.batch-size", "12", "--resume", two3)) == 0
    _close(
        read_weights(runs / "two-to-one" / "checkpoints" / "step-00000006"),
        read_weights(runs / "one" / "checkpoints" / "step-00000006"),
    )
    # With accumulation: the non-final micro-batches skip the sharded gradients' reduce-scatter.
    accelerate_launch(2, *_args(runs, "one-to-two", "--data.batch-size", "3", "--grad-accum-steps", "2",
                                "--parallel.strategy", "fsdp", "--resume", one3))  # fmt: skip
    resumed = read_weights(runs / "one-to-two" / "checkpoints" / "step-00000006")
    _close(resumed, read_weights(runs / "one" / "checkpoints" / "step-00000006"))


@pytest.mark.slow
def test_a_damaged_shard_is_caught_and_resume_auto_skips_its_checkpoint(runs, accelerator_for_checks):
    copy = runs / "damaged"
    subprocess.run(["cp", "-r", runs / "two", copy], check=True)
    shard = copy / "checkpoints" / "step-00000006" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp does not match its checksum"):
        ckpt.verify(shard.parent)
    checkpointer = ckpt.Checkpointer(copy, accelerator_for_checks, 5, False, sharded=True)
    assert ckpt.resolve_resume("auto", checkpointer) == copy / "checkpoints" / "step-00000003"


@pytest.mark.slow
def test_a_sharded_save_killed_before_its_commit_resumes_from_the_last_one(runs, tmp_path):
    """Both ranks have written their shards of step 6, and rank 0 is about to write COMPLETE: SIGKILL. The same
    command again resumes from step 3 and ends where the uninterrupted run ends."""
    args = _args(tmp_path, "killed", "--data.batch-size", "6", "--parallel.strategy", "fsdp")
    marker = tmp_path / "paused.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "LAUNCHER_TEST_PAUSE_AT": "before-marker@6", "LAUNCHER_TEST_PAUSE_MARKER": str(marker)}  # fmt: skip
    proc = subprocess.Popen(accelerate_cmd(2, *args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before the pause: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "timed out waiting for the pause"
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait()
    tmp = tmp_path / "killed" / "checkpoints" / ".tmp-step-00000006"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {p.name for p in tmp.iterdir()}
    assert json.loads((tmp_path / "killed" / "checkpoints" / "latest").read_text())["step"] == 3
    accelerate_launch(2, *args)
    assert metrics(tmp_path / "killed", "setup")[-1]["resumed_from"].endswith("step-00000003")
    _close(
        read_weights(tmp_path / "killed" / "checkpoints" / "step-00000006"),
        read_weights(runs / "one" / "checkpoints" / "step-00000006"),
    )


@pytest.mark.slow
def test_bf16_through_fsdps_mixed_precision_policy_trains_close_to_fp32(runs, tmp_path):
    """bf16 parameters in forward and backward, fp32 reduction and fp32 sharded weights: the losses stay within
    bf16's precision of the fp32 run's, and the checkpoint holds fp32 weights."""
    accelerate_launch(2, *_args(tmp_path, "bf16", "--data.batch-size", "6", "--parallel.strategy", "fsdp",
                                "--mixed-precision", "bf16"))  # fmt: skip
    assert _losses(tmp_path / "bf16") == pytest.approx(_losses(runs / "one"), rel=2e-2)
    weights = read_weights(tmp_path / "bf16" / "checkpoints" / "step-00000006")
    assert {w.dtype for k, w in weights.items() if k != "vocab"} == {torch.float32}


@pytest.mark.slow
def test_an_fsdp_run_killed_at_an_arbitrary_step_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL wherever the run happens to be once it has logged step 15 (between checkpoints every 10 steps), then
    the same command: `--resume auto` continues from the last committed checkpoint, and the final shards equal an
    uninterrupted FSDP run's, bit for bit (same processes, same reduction order)."""
    common = ["--data.batch-size", "6", "--parallel.strategy", "fsdp", "--max-steps", "40",
              "--checkpoint.every-steps", "10"]  # fmt: skip
    accelerate_launch(2, *_args(tmp_path, "straight", *common))
    args = _args(tmp_path, "killed", *common)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(accelerate_cmd(2, *args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    log = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (log.is_file() and any(r.get("step", 0) >= 15 for r in metrics(tmp_path / "killed", "train"))):
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before step 15"
        time.sleep(0.02)
    kill_tree(proc.pid)
    proc.wait()
    killed_at = max(r["step"] for r in metrics(tmp_path / "killed", "train"))
    assert killed_at < 40, "the run finished before it was killed"
    accelerate_launch(2, *args)
    resumed_from = metrics(tmp_path / "killed", "setup")[-1]["resumed_from"]
    assert resumed_from is not None and int(resumed_from[-8:]) <= killed_at
    got = read_weights(tmp_path / "killed" / "checkpoints" / "step-00000040")
    want = read_weights(tmp_path / "straight" / "checkpoints" / "step-00000040")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_asynchronous_saves_and_the_moving_average_of_sharded_weights(runs, tmp_path):
    """One run with --ema.decay and --checkpoint.async-save under FSDP. Async: the shards are copied to host memory
    at the step, written by torch.distributed.checkpoint's thread and committed by the checkpointer's; the
    checkpoints hold exactly the model the synchronous run holds (the average does not touch it). EMA: each rank
    averages its own shards, evaluated and saved by swapping them into the sharded model; ema.safetensors and
    eval/ema_loss equal one process's, and a resume of the sharded checkpoint on one process (DDP) carries the
    average on."""
    ema = ["--ema.decay", "0.9", "--ema.warmup-steps", "0"]
    assert train(*_args(tmp_path, "one", "--data.batch-size", "12", *ema)) == 0
    accelerate_launch(2, *_args(tmp_path, "two", "--data.batch-size", "6", "--parallel.strategy", "fsdp", *ema,
                                "--checkpoint.async-save"))  # fmt: skip
    for step in ("step-00000003", "step-00000006"):
        ckpt.verify(tmp_path / "two" / "checkpoints" / step)
        got = read_weights(tmp_path / "two" / "checkpoints" / step)
        want = read_weights(runs / "two" / "checkpoints" / step)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    want = read_weights(tmp_path / "one" / "ema.safetensors")
    _close(read_weights(tmp_path / "two" / "ema.safetensors"), want)
    assert metrics(tmp_path / "two", "final")[0]["ema_loss"] == pytest.approx(
        metrics(tmp_path / "one", "final")[0]["ema_loss"], rel=1e-6
    )
    two3 = tmp_path / "two" / "checkpoints" / "step-00000003"
    assert train(*_args(tmp_path, "two-to-one", "--data.batch-size", "12", *ema, "--resume", two3)) == 0
    _close(read_weights(tmp_path / "two-to-one" / "ema.safetensors"), want)
