"""Regression tests of the hardening issue: resume and the loop (epoch ends, changed settings, EMA, plateau, the
lr's step label, divergence), tampered checkpoints, run directories that cannot be written, and Ctrl-C.

Each test failed on the code before its fix. They train the MLP test recipe on the real mnist-mini digits, in this
process (one CPU process) unless a real signal needs a real process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, TEST_RECIPES, assert_same_tensors, final_weights, metrics, run_args, train
from launcher.config import ScheduleConfig
from launcher.schedules import lr_multiplier, schedule_steps

MLP = TEST_RECIPES / "mlp.py"
pytestmark = pytest.mark.slow


def run(tmp_path: Path, mnist_root: Path, name: str, *args: str) -> int:
    return train(*run_args(MLP, tmp_path, name, mnist_root, *args))


def state_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "state.json").read_text())["state"]


def tensorboard_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


# ---- 1. epoch-end checkpoints -----------------------------------------------------------------------------------
def test_an_epoch_end_checkpoint_resumes_with_no_drop_last(tmp_path, mnist_root):
    # 8000 digits in batches of 208 without dropping the last: 39 steps per epoch, the last one of 96 digits, so
    # a checkpoint every 39 steps lands on the epoch's last step. A constant lr after warm-up: the run length
    # (1 epoch, then 2) does not enter the schedule.
    args = ("--data.batch-size", "208", "--data.no-drop-last", "--checkpoint.every-steps", "39",
            "--checkpoint.keep-last", "5", "--logging.every-steps", "10", "--schedule.decay", "constant")  # fmt: skip
    assert run(tmp_path, mnist_root, "straight", *args, "--max-epochs", "2") == 0
    assert run(tmp_path, mnist_root, "resumed", *args, "--max-epochs", "1") == 0
    saved = state_of(tmp_path / "resumed" / "checkpoints" / "step-00000039")
    # The epoch is finished, and its end-of-epoch evaluation is in the checkpoint.
    assert (saved["epoch"], saved["samples_in_epoch"], saved["best_step"]) == (1, 0, 39)
    assert saved["best_value"] == metrics(tmp_path / "resumed", "eval")[0]["accuracy"]
    assert run(tmp_path, mnist_root, "resumed", *args, "--max-epochs", "2") == 0
    assert_same_tensors(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"))


# ---- 2. settings changed on resume ------------------------------------------------------------------------------
def test_a_changed_lr_on_resume_is_applied_and_named_and_a_changed_seed_mid_epoch_is_refused(
    tmp_path, mnist_root, capsys
):
    assert run(tmp_path, mnist_root, "r", "--max-steps", "20", "--logging.every-steps", "5") == 0
    assert run(tmp_path, mnist_root, "r", "--max-steps", "30", "--seed", "1") == 2
    assert "seed 0 -> 1 in the middle of an epoch" in capsys.readouterr().err
    assert (
        run(tmp_path, mnist_root, "r", "--max-steps", "30", "--optim.lr", "0.5", "--optim.momentum", "0.8")
        == 0
    )
    run_dir = tmp_path / "r"
    log = (run_dir / "train.log").read_text()
    assert "resuming with changed settings, applied from step 20 on" in log
    for change in ("optim.lr 0.05 -> 0.5", "optim.momentum 0.9 -> 0.8", "max_steps 20 -> 30"):
        assert change in log
    groups = torch.load(run_dir / "checkpoints" / "step-00000030" / "optimizer.pt", weights_only=True)
    assert groups["param_groups"][0]["initial_lr"] == 0.5 and groups["param_groups"][0]["momentum"] == 0.8
    # The schedule continues from step 20 with the new peak and the new length (the recipe: linear warm-up over
    # 10 steps, cosine decay). TensorBoard's lr at step N is the lr of the N-th update (index N - 1).
    steps = schedule_steps(ScheduleConfig(warmup="linear", warmup_steps=10, decay="cosine"), 250, 30)
    cfg = ScheduleConfig(warmup="linear", warmup_steps=10, decay="cosine")
    logged = tensorboard_scalars(run_dir, "train/lr")
    for n in (21, 25, 29):
        assert logged[n] == pytest.approx(0.5 * lr_multiplier(n - 1, steps, cfg), rel=1e-6)
    assert logged[20] == pytest.approx(0.05 * lr_multiplier(19, schedule_steps(cfg, 250, 20), cfg), rel=1e-6)


# ---- 6. EMA switched on in a resumed run -------------------------------------------------------------------------
def test_an_ema_switched_on_at_resume_starts_from_the_resumed_weights(tmp_path, mnist_root):
    assert run(tmp_path, mnist_root, "e", "--max-steps", "20", "--eval-every-epochs", "0") == 0
    assert run(tmp_path, mnist_root, "e", "--max-steps", "21", "--eval-every-epochs", "0", "--ema.decay", "0.99",
               "--ema.warmup-steps", "0") == 0  # fmt: skip
    resumed = load_file(tmp_path / "e" / "checkpoints" / "step-00000020" / "model.safetensors")
    after = load_file(tmp_path / "e" / "checkpoints" / "step-00000021" / "model.safetensors")
    ema = load_file(tmp_path / "e" / "ema.safetensors")
    for key in ema:  # one update of an average that started at the resumed weights
        torch.testing.assert_close(ema[key], torch.lerp(resumed[key], after[key], 0.01), rtol=0, atol=1e-6)


# ---- 7 and 11. plateau cuts, and the step an lr is logged at ------------------------------------------------------
PLATEAU = ("--schedule.decay", "plateau", "--schedule.warmup", "none", "--schedule.plateau-patience", "0",
           "--schedule.gamma", "0.5", "--eval-every-steps", "10", "--logging.every-steps", "10",
           "--checkpoint.every-steps", "10", "--checkpoint.keep-last", "10")  # fmt: skip


def test_a_plateau_cut_applies_to_the_next_update_and_a_plateau_run_resumes_bit_identically(
    tmp_path, mnist_root
):
    # A threshold of 100% means no evaluation after the first counts as an improvement: the lr halves at the
    # evaluations of steps 20 and 30.
    args = (*PLATEAU, "--schedule.plateau-threshold", "1.0")
    assert run(tmp_path, mnist_root, "straight", *args, "--max-steps", "40") == 0
    lr = tensorboard_scalars(tmp_path / "straight", "train/lr")
    assert [lr[n] / 0.05 for n in (20, 21, 30, 31, 40)] == pytest.approx([1, 0.5, 0.5, 0.25, 0.25], rel=1e-6)
    assert run(tmp_path, mnist_root, "resumed", *args, "--max-steps", "30") == 0
    assert run(tmp_path, mnist_root, "resumed", *args, "--max-steps", "40") == 0
    assert_same_tensors(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"))


def test_tensorboard_and_metrics_jsonl_label_the_lr_with_the_same_step(tmp_path, mnist_root):
    # The recipe's linear warm-up changes the lr at every step, so a label one step off cannot go unnoticed.
    assert run(tmp_path, mnist_root, "l", "--max-steps", "12", "--logging.every-steps", "3") == 0
    logged = tensorboard_scalars(tmp_path / "l", "train/lr")
    records = metrics(tmp_path / "l", "train")
    assert sorted(logged) == list(range(1, 13)) and [r["step"] for r in records] == [3, 6, 9, 12]
    for record in records:
        assert logged[record["step"]] == pytest.approx(record["lr"], rel=1e-6)
    assert logged[1] == pytest.approx(0.05 * 0.1, rel=1e-6)  # the first update: warm-up from 10% of the peak


# ---- 12. divergence ---------------------------------------------------------------------------------------------
def strict_json_lines(path: Path) -> list[dict]:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_diverging_run_stops_with_a_clear_error_and_nan_never_becomes_the_best(
    tmp_path, mnist_root, capsys
):
    args = ("--optim.lr", "1e6", "--max-steps", "40", "--logging.every-steps", "5", "--eval-every-steps", "5")
    assert run(tmp_path, mnist_root, "stop", *args) == 2
    err = capsys.readouterr().err
    assert "training diverged: the training loss is" in err and "--no-stop-on-nonfinite" in err
    records = strict_json_lines(tmp_path / "stop" / "metrics.jsonl")
    assert any(r["kind"] == "diverged" for r in records) and not any(r["kind"] == "final" for r in records)
    # Trained on: the run ends, but no evaluation with a non-finite loss becomes the best.
    assert run(tmp_path, mnist_root, "on", *args, "--no-stop-on-nonfinite") == 0
    records = strict_json_lines(tmp_path / "on" / "metrics.jsonl")
    assert any(r["kind"] == "train" and r["loss"] is None for r in records)  # NaN is written as null
    evals = {r["step"]: r for r in records if r["kind"] == "eval"}
    best_step = records[-1]["best_step"]
    assert records[-1]["kind"] == "final" and (best_step is None or evals[best_step]["loss"] is not None)
    best = tmp_path / "on" / "best.safetensors"
    assert not best.exists() or all(torch.isfinite(t).all() for t in load_file(best).values())


# ---- 8. fp16 updates the grad scaler skips --------------------------------------------------------------------
def test_an_update_the_fp16_grad_scaler_skips_is_reported_as_skipped():
    """Accelerate's optimizer wrapper around a real grad scaler (CPU: Accelerate itself makes a scaler only on a
    GPU; see the gpu test below): the loop advances schedule, EMA and step count only when this says True."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    from launcher.train import optimizer_step

    Accelerator(cpu=True)
    try:
        param = torch.nn.Parameter(torch.ones(3))
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        wrapped = AcceleratedOptimizer(torch.optim.SGD([param], lr=0.1), scaler=scaler)
        scaler.scale(param.sum()).backward()
        assert optimizer_step(wrapped) and torch.equal(param.detach(), torch.full((3,), 0.9))
        scaler.scale((param * float("inf")).sum()).backward()
        assert not optimizer_step(wrapped)
        assert torch.equal(param.detach(), torch.full((3,), 0.9)) and scaler.get_scale() == 512.0
        assert param.grad is None  # zeroed either way
        assert optimizer_step(torch.optim.SGD([param], lr=0.1)) is True  # no scaler: never skipped
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a grad scaler needs a CUDA GPU")
def test_fp16_steps_count_only_the_updates_taken(tmp_path, mnist_root):
    # An lr this large overflows fp16 gradients now and then: the scaler skips those updates.
    assert run(tmp_path, mnist_root, "h", "--mixed-precision", "fp16", "--max-steps", "60", "--optim.lr", "5",
               "--logging.every-steps", "5", "--no-stop-on-nonfinite", "--eval-every-epochs", "0") == 0  # fmt: skip
    skipped = sum(r.get("skipped_steps", 0) for r in metrics(tmp_path / "h", "train"))
    assert sorted(tensorboard_scalars(tmp_path / "h", "train/lr")) == list(range(1, 61))
    setup, final = metrics(tmp_path / "h", "setup")[0], metrics(tmp_path / "h", "final")[0]
    assert final["step"] == 60 and setup["total_steps"] == 60
    samples = state_of(tmp_path / "h" / "checkpoints" / "step-00000060")["samples_seen"]
    assert samples == (60 + skipped) * 32  # every micro-batch was trained on, skipped or not


# ---- 19. a tampered state.json ----------------------------------------------------------------------------------
def forge(checkpoint: Path, **changes: object) -> None:
    """Edit state.json and rewrite COMPLETE to match, as a hand-edited checkpoint would be."""
    record = json.loads((checkpoint / "state.json").read_text())
    record["state"].update(changes)
    data = (json.dumps(record, indent=2) + "\n").encode()
    (checkpoint / "state.json").write_bytes(data)
    manifest = json.loads((checkpoint / "COMPLETE").read_text())
    manifest["files"]["state.json"] = {"size": len(data), "crc32": [f"{zlib.crc32(data):08x}"]}
    (checkpoint / "COMPLETE").write_text(json.dumps(manifest, indent=2) + "\n")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"best_value": "x", "best_step": 10}, "best_value must be a finite number or null, got 'x'"),
        ({"samples_in_epoch": -320}, "samples_in_epoch must be a non-negative integer, got -320"),
        ({"epoch": 1e9}, "epoch must be a non-negative integer, got 1000000000.0"),
    ],
)
def test_a_tampered_state_json_is_refused_with_a_message(tmp_path, mnist_root, capsys, changes, message):
    assert run(tmp_path, mnist_root, "t", "--max-steps", "10", "--eval-every-epochs", "0") == 0
    checkpoint = tmp_path / "t" / "checkpoints" / "step-00000010"
    forge(checkpoint, **changes)
    capsys.readouterr()
    assert run(tmp_path, mnist_root, "t", "--max-steps", "20", "--resume", str(checkpoint)) == 2
    assert message in capsys.readouterr().err


# ---- 21. run directories that cannot be written -------------------------------------------------------------------
def test_an_output_dir_that_is_a_file_is_a_one_line_error(tmp_path, mnist_root, capsys):
    (tmp_path / "file").write_text("")
    assert train(*run_args(MLP, tmp_path / "file", "x", mnist_root, "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: cannot write the run directory")
        and "--output-dir" in err
        and len(err.splitlines()) == 1
    )


def test_a_failed_start_leaves_no_run_directory_and_a_failed_resume_logs_its_error(
    tmp_path, mnist_root, capsys
):
    assert train(*run_args(MLP, tmp_path, "gone", tmp_path / "no-data", "--max-steps", "1")) == 2
    assert not (tmp_path / "gone").exists() and "error:" in capsys.readouterr().err
    assert run(tmp_path, mnist_root, "kept", "--max-steps", "5", "--eval-every-epochs", "0") == 0
    assert run(tmp_path, mnist_root, "kept", "--max-steps", "10", "--data.batch-size", "16") == 2
    assert "error: cannot resume from" in (tmp_path / "kept" / "train.log").read_text()


def test_unwritable_metrics_are_a_clear_error_and_an_unwritable_train_log_only_a_warning(
    tmp_path, mnist_root, capsys
):
    assert run(tmp_path, mnist_root, "m", "--max-steps", "5", "--eval-every-epochs", "0") == 0
    run_dir = tmp_path / "m"
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC, as on a full disk
    assert run(tmp_path, mnist_root, "m", "--max-steps", "10") == 2
    err = capsys.readouterr().err
    assert (
        f"cannot write {run_dir / 'metrics.jsonl'} (No space left on device)" in err
        and "Traceback" not in err
    )
    assert [p.name for p in (run_dir / "checkpoints").glob("step-*")] == ["step-00000005"]
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "train.log").unlink()
    (run_dir / "train.log").symlink_to("/dev/full")
    assert run(tmp_path, mnist_root, "m", "--max-steps", "10") == 0
    out = capsys.readouterr()
    assert "cannot write" in out.out and "train.log" in out.out and "Logging error" not in out.err


# ---- 23. Ctrl-C ---------------------------------------------------------------------------------------------------
def start(
    tmp_path: Path, mnist_root: Path, name: str, *args: str, env: dict | None = None
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "launcher.train",
        *map(str, run_args(MLP, tmp_path, name, mnist_root, *args)),
    ]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for(path: Path, proc: subprocess.Popen, predicate=lambda text: True, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not (path.exists() and predicate(path.read_text())):
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


STOPPABLE = ("--max-steps", "100000", "--schedule.decay", "constant", "--schedule.warmup", "none",
             "--logging.every-steps", "1", "--eval-every-epochs", "0", "--checkpoint.every-epochs", "0")  # fmt: skip


def test_ctrl_c_saves_and_stops_and_the_run_resumes_exactly(tmp_path, mnist_root):
    proc = start(tmp_path, mnist_root, "int", *STOPPABLE)
    wait_for(tmp_path / "int" / "metrics.jsonl", proc, lambda text: '"kind": "train"' in text)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted: saving a checkpoint" in err, err[-3000:]
    stopped = json.loads((tmp_path / "int" / "checkpoints" / "latest").read_text())["step"]
    log = (tmp_path / "int" / "train.log").read_text()
    assert f"stopped by SIGINT at step {stopped} after saving; rerun the same command to resume" in log
    assert "requeue" not in log
    # Resumed and uninterrupted (a constant lr: the run length does not enter the schedule) agree bit for bit.
    length = ("--max-steps", str(stopped + 5))
    assert run(tmp_path, mnist_root, "int", *STOPPABLE, *length) == 0
    assert run(tmp_path, mnist_root, "straight", *STOPPABLE, *length) == 0
    assert_same_tensors(final_weights(tmp_path / "int"), final_weights(tmp_path / "straight"))


def test_a_second_ctrl_c_exits_at_once(tmp_path, mnist_root):
    # The stop's save pauses (test hook) until killed: only the second Ctrl-C can end the process.
    marker = tmp_path / "paused.json"
    env = {"LAUNCHER_TEST_PAUSE_AT": "tmp-created", "LAUNCHER_TEST_PAUSE_MARKER": str(marker)}
    proc = start(tmp_path, mnist_root, "twice", *STOPPABLE, env=env)
    wait_for(tmp_path / "twice" / "metrics.jsonl", proc, lambda text: '"kind": "train"' in text)
    proc.send_signal(signal.SIGINT)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted again: exiting now" in err, err[-3000:]
    assert not (tmp_path / "twice" / "checkpoints" / "latest").exists()
