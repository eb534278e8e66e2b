"""Checkpoint faults: saves killed with SIGKILL at every stage, corrupted checkpoints, a full or read-only disk,
rotation and the strict schema. Real processes, real files and a real full disk (a small tmpfs); no mocks.

Run as a script, this file is also the driver that the process-level tests start:

    python tests/test_checkpoint_faults.py sweep|midwrite|fsize|ranks OUT [--async]

The driver saves with the real Checkpointer and a real `accelerate.Accelerator(cpu=True)`. For `sweep` it first
records every file-system call of one save, in order, with a Python audit hook (no hook in the production code),
then forks one child per call and SIGKILLs the child right before it: each stage of the commit protocol is hit
exactly, every time. For `midwrite` it SIGKILLs a child from outside while a file is half written. The test then
examines what each dead child left behind. `fsize` saves under RLIMIT_FSIZE; `ranks` is one of two gloo processes.
The test that kills a real training run mid-save has the save stop itself at a named point
(LAUNCHER_TEST_PAUSE_AT, launcher.checkpoint.pause_point) and then SIGKILLs it: no polling race.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import kill_tree
from launcher import checkpoint as ckpt
from launcher.checkpoint import checkpointer as saving
from launcher.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
META = {
    "fingerprint": {"model": {}, "optimizer": "adamw", "global_batch": 1, "train_samples": 1},
    "config": {},
}
# File-system calls of a save that the sweep kills before (reads of the directory listing are not among them).
WATCHED = {"open", "os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"}


# ---- shared helpers ------------------------------------------------------------------------------------------
def make_model(width: int = 32, depth: int = 2, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """An MLP and its AdamW after one step (so the optimizer has state), deterministic in `seed`."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, optimizer)
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x = torch.linspace(-1, 1, 4 * model[0].in_features).reshape(4, -1)
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def flat_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for index, entry in optimizer.state_dict()["state"].items():
        out.update({f"optimizer.{index}.{k}": v.clone() for k, v in entry.items() if torch.is_tensor(v)})
    return out


def checkpointer(run: Path, accelerator: Accelerator, keep_last: int = 1, **kw: Any) -> ckpt.Checkpointer:
    return ckpt.Checkpointer(run, accelerator, keep_last=keep_last, tolerate_failures=False, **kw)


def save(
    c: ckpt.Checkpointer, model: nn.Module, optimizer: Any, step: int, best_step: int | None = None
) -> bool:
    # A best step comes with its best value: a checkpoint with one and not the other does not verify.
    best_value = None if best_step is None else 1.0 / (1 + best_step)
    state = ckpt.TrainState(step=step, best_value=best_value, best_step=best_step)
    return c.save(model, optimizer, None, state, META)


def names(run: Path) -> list[str]:
    """Entries of the checkpoints directory, `latest` excluded."""
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name != "latest")


def latest(run: Path) -> str:
    return json.loads((run / "checkpoints" / "latest").read_text())["checkpoint"]


def assert_restores(path: Path, expected: dict[str, torch.Tensor], accelerator: Accelerator) -> None:
    """`ckpt.load` into a differently initialised model gives exactly the expected weights and optimizer state."""
    width = expected["model.0.weight"].shape[1]
    depth = sum(1 for k in expected if k.startswith("model.") and k.endswith(".weight"))
    model, optimizer = make_model(width, depth, seed=1234)
    ckpt.load(path, model, optimizer, None, accelerator)
    actual = flat_state(model, optimizer)
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), f"{path}: {key} differs after load"


@pytest.fixture
def accelerator() -> Iterator[Accelerator]:
    yield Accelerator(cpu=True)
    # Other tests build Accelerators with other settings (mixed precision); the state is a singleton.
    AcceleratorState._reset_state(reset_partial_state=False)


@pytest.fixture
def launcher_log() -> Iterator[list[str]]:
    """Messages of the `launcher` logger (train runs in this process may have turned its propagation off)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("launcher")
    handler, level = Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def scratch(tmp_path) -> Iterator[Path]:
    """A directory on /dev/shm where there is one: the drivers kill dozens of saves, and on a busy disk their
    fsyncs would take most of the test's time. (A killed process, unlike a power cut, loses nothing that was
    written but not yet fsynced, so a tmpfs changes nothing that these tests check.)"""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="ckpt-faults-", dir=shm))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_driver(mode: str, out: Path, *extra: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, __file__, mode, str(out), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"driver {mode} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def killed_by_sigkill(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def wait_for_pause(proc: subprocess.Popen, marker: Path, log: Path, timeout: float = 120) -> dict[str, Any]:
    """Wait until `proc` has stopped at its LAUNCHER_TEST_PAUSE_AT point (it writes `marker`, then sleeps until
    killed); return the marker. Polling for the marker cannot race: the process stays where it is."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it paused:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            kill_tree(proc.pid)
            raise AssertionError(f"the run never paused:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    return json.loads(marker.read_text())


def assert_recovers(
    run: Path,
    accelerator: Accelerator,
    expected: dict[int, dict[str, torch.Tensor]],
    want: int,
    log: list[str],
) -> None:
    """What a crash left in `run` is safe: every committed checkpoint verifies, `latest` names one of them,
    `--resume auto` picks checkpoint `want` and it restores exactly; the next save ignores and removes the
    leftovers and leaves one checkpoint (keep-last 1)."""
    committed = ckpt.Checkpointer(run, accelerator, 1, False).list()
    assert committed, f"{run}: no checkpoint left at all"
    for path in committed:
        ckpt.verify(path)  # a committed checkpoint is never half written
    if (run / "checkpoints" / "latest").exists():
        ckpt.verify(run / "checkpoints" / latest(run))
    found = ckpt.resolve_resume("auto", checkpointer(run, accelerator))
    assert found is not None and found.name == ckpt.step_dir_name(want), (found, names(run))
    assert_restores(found, expected[want], accelerator)
    leftovers = [n for n in names(run) if n.startswith(".tmp-")]
    log.clear()
    model, optimizer = make_model()
    assert save(checkpointer(run, accelerator), model, optimizer, 3)
    assert names(run) == ["step-00000003"]
    assert latest(run) == "step-00000003"
    for name in leftovers:
        assert any("left over from an interrupted save" in m and name in m for m in log), (name, log)


# ---- 1. SIGKILL during a save --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_before_every_file_system_call_of_a_save_keep_last_1(
    scratch, accelerator, launcher_log, mode
):
    """Keep-last 1, a valid checkpoint of step 1, then a save of step 2 killed before each of its file-system
    calls in turn (and once not at all): every time, a valid checkpoint remains, `--resume auto` picks step 1
    before the commit rename and step 2 after it, and the next save cleans up."""
    run_driver("sweep", scratch, *(["--async"] if mode == "async" else []))
    events = json.loads((scratch / "events.json").read_text())
    results = json.loads((scratch / "results.json").read_text())
    expected = {s: load_file(scratch / f"expected-{s}.safetensors") for s in (1, 2)}

    calls = [" ".join(e) for e in events]
    # The commit point: the rename that makes step 2 a checkpoint. Killed before it, a resume must find step 1.
    commit = next(
        i for i, e in enumerate(events) if e[0] == "os.rename" and e[2] == "checkpoints/step-00000002"
    )
    assert len(results) == len(events) + 1
    for result in results:
        k, run = result["k"], Path(result["run"])
        if k is None:  # the save that was not killed
            assert result["status"] == 0
            want = 2
        else:
            assert killed_by_sigkill(result["status"]), f"kill point {k} ({calls[k]}) was never reached"
            want = 2 if k > commit else 1
        try:
            assert_recovers(run, accelerator, expected, want, launcher_log)
        except (AssertionError, CheckpointError) as exc:
            where = "no kill" if k is None else f"killed before call {k}: {calls[k]}"
            raise AssertionError(f"{where}: {exc}\nthe calls of a save: {calls}") from exc

    # The sweep covered each stage the protocol names; if a change drops one, this says which.
    tmp = "checkpoints/.tmp-step-00000002"
    stages = {
        "tmp dir created": f"os.mkdir {tmp}",
        "files being written": f"open {tmp}/optimizer.pt",
        "files written, no marker yet": f"open {tmp}/COMPLETE",
        "marker written, not renamed": f"os.rename {tmp} checkpoints/step-00000002",
        "renamed, `latest` not updated": "open checkpoints/.tmp-latest",
        "`latest` written, not replaced": "os.rename checkpoints/.tmp-latest checkpoints/latest",
        "`latest` updated, old one not yet deleted": (
            "os.rename checkpoints/step-00000001 checkpoints/.tmp-delete-step-00000001"
        ),
        "old one being deleted": "shutil.rmtree checkpoints/.tmp-delete-step-00000001",
    }
    for stage, call in stages.items():
        assert call in calls, f"stage '{stage}' ({call}) is not among the calls of a save: {calls}"
    assert (
        calls.index(stages["files written, no marker yet"])
        < commit
        < calls.index(stages["old one being deleted"])
    )


def test_sigkill_while_a_file_is_half_written(scratch, accelerator, launcher_log):
    """A save killed from outside while optimizer.pt, then model.safetensors, is half written (safetensors writes
    into a temporary file of the full size and renames it, so there the partial file is that temporary one): the
    partial file is ignored, the previous checkpoint is used, and the next save removes it."""
    run_driver("midwrite", scratch)
    results = json.loads((scratch / "results.json").read_text())
    expected = {1: load_file(scratch / "expected-1.safetensors")}
    assert [r["target"] for r in results] == ["optimizer.pt", "model.safetensors"]
    for result in results:
        assert killed_by_sigkill(result["status"])
        assert 0 < result["written_at_kill"] < result["full_size"], result  # it really died mid-file
        run = Path(result["run"])
        tmp = run / "checkpoints" / ".tmp-step-00000002"
        assert (tmp / result["partial"]).is_file()
        # safetensors >= 0.8 writes a temporary file and renames it when complete; earlier ones write in place
        if result["partial"].startswith(".tmp"):
            assert not (tmp / "model.safetensors").exists()
        assert_recovers(run, accelerator, expected, 1, launcher_log)


@pytest.mark.parametrize(
    ("mode", "file", "thread"),
    [("sync", "optimizer.pt", "MainThread"), ("async", "model.safetensors", "ckpt-save")],
)
def test_sigkill_of_a_training_run_during_a_save_then_resume_auto(scratch, mode, file, thread):
    """The real CLI: a training run saving every step is SIGKILLed while the directory of checkpoint 5 is being
    written (with async_save, in the background thread while training goes on); the same command again resumes
    from checkpoint 4, the newest valid one, removes the leftover and finishes. The save stops at that point by
    itself (LAUNCHER_TEST_PAUSE_AT) and the kill follows: polling for `.tmp-step-*` instead could miss a save
    that takes milliseconds on a tmpfs."""
    recipe = tiny_recipe(scratch)
    extra = ["--checkpoint.async-save"] if mode == "async" else []
    cmd = [*train_cmd(recipe, scratch, "--max-steps", "30", "--checkpoint.every-steps", "1", *extra)]
    ckdir = scratch / "r" / "checkpoints"
    env = {**os.environ, "LAUNCHER_TEST_PAUSE_AT": f"written:{file}@5"}
    # The default marker (in the run directory) once, a given path once.
    marker = scratch / "r" / ckpt.PAUSE_MARKER if mode == "sync" else scratch / "paused.json"
    if mode == "async":
        env["LAUNCHER_TEST_PAUSE_MARKER"] = str(marker)
    log = scratch / "killed-run.log"
    with open(log, "w") as out:  # a file, not a pipe: nobody reads a pipe while the run is being waited for
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        paused = wait_for_pause(proc, marker, log)
    finally:
        if proc.poll() is None:  # never a PID that was already reaped, and may be someone else's by now
            kill_tree(proc.pid)
        proc.wait()
    assert paused == {"point": "written", "file": file, "step": 5, "pid": proc.pid, "thread": thread}
    assert proc.returncode == -signal.SIGKILL
    written = ["optimizer.pt", "rng-00000.pt"] + (["model.safetensors"] if mode == "async" else [])
    assert sorted(p.name for p in (ckdir / ".tmp-step-00000005").iterdir()) == sorted(written)
    committed = sorted(p.name for p in ckdir.glob("step-*"))
    assert committed and committed[-1] == "step-00000004" and latest(scratch / "r") == "step-00000004"
    for name in committed:
        ckpt.verify(ckdir / name)
    leftovers = sorted(p.name for p in ckdir.glob(".tmp-*"))
    assert leftovers == [".tmp-step-00000005"]

    clean = {k: v for k, v in os.environ.items() if not k.startswith("LAUNCHER_TEST_PAUSE")}
    result = subprocess.run(cmd, cwd=REPO, env=clean, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resumed from {ckdir / committed[-1]}" in result.stdout
    for name in leftovers:
        assert f"removing {ckdir / name}, left over from an interrupted save" in result.stdout
    assert "done: step 30" in result.stdout
    assert not list(ckdir.glob(".tmp-*"))
    ckpt.verify(ckdir / "step-00000030")


def test_pause_points_are_parsed_strictly():
    """LAUNCHER_TEST_PAUSE_AT: a point, a file for `written`, a step; anything else is an error at import, not a
    test that waits for a marker until its timeout."""
    assert saving._pause_spec(None) is None and saving._pause_spec("") is None
    assert saving._pause_spec("before-rename") == ("before-rename", None, None)
    assert saving._pause_spec("written:optimizer.pt@5") == ("written", "optimizer.pt", 5)
    assert saving._pause_spec("tmp-created@12") == ("tmp-created", None, 12)
    for bad in ("before-renam", "before-rename:COMPLETE", "written@five", "written:optimizer.pt@-1"):
        with pytest.raises(ValueError, match="expected POINT"):
            saving._pause_spec(bad)
    assert saving._PAUSE_AT is None  # never armed in the test process itself


def test_two_processes_agree_when_one_fails_to_write(tmp_path):
    """Two real processes (gloo): when rank 1 cannot write its part (RLIMIT_FSIZE), both ranks raise, synchronous
    or async_save (whose background threads agree over their own gloo group), and nothing is committed; the
    saves around the failures commit with both ranks' RNG files."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "ACCELERATE_USE_CPU": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "ranks", str(tmp_path)],
            cwd=REPO,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    rank0, rank1 = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    for outcome in (rank0, rank1):
        assert outcome["sync"][0] is True and outcome["async"][0] is True
    assert rank0["sync"][1].startswith("could not save checkpoint step-00000002")
    assert "another process failed to write its part" in rank0["sync"][1]
    assert rank1["sync"][1].startswith("could not save checkpoint step-00000002")
    assert "File too large" in rank1["sync"][1]
    assert rank0["async"][1].startswith("could not save checkpoint step-00000004")
    assert "another process failed to write its part" in rank0["async"][1]
    assert "File too large" in rank1["async"][1]
    run = tmp_path / "run"
    assert names(run) == ["step-00000001", "step-00000003"] and latest(run) == "step-00000003"
    for name in names(run):
        assert ckpt.verify(run / "checkpoints" / name)["world_size"] == 2
        assert (run / "checkpoints" / name / "rng-00001.pt").is_file()


# ---- 2. corrupted checkpoints --------------------------------------------------------------------------------
def truncate(path: Path) -> str:
    f = path / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 100)
    return "model.safetensors is"


def drop_marker(path: Path) -> str:
    (path / ckpt.MARKER).unlink()
    return "no COMPLETE marker"


def flip_byte(path: Path) -> str:
    f = path / "optimizer.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(data)  # same size: only the checksum can tell
    return "optimizer.pt does not match its checksum"


def garble_marker(path: Path) -> str:
    marker = path / ckpt.MARKER
    marker.write_text(marker.read_text()[:40])
    return "unreadable COMPLETE marker"


def drop_file(path: Path) -> str:
    (path / "optimizer.pt").unlink()
    return "missing ['optimizer.pt']"


@pytest.mark.parametrize("damage", [truncate, drop_marker, flip_byte, garble_marker, drop_file])
def test_damaged_newest_checkpoint_is_skipped_and_an_explicit_resume_to_it_is_an_error(
    tmp_path, accelerator, launcher_log, damage
):
    c = checkpointer(tmp_path, accelerator, keep_last=3)
    model, optimizer = make_model()
    assert save(c, model, optimizer, 1)
    good = flat_state(model, optimizer)
    train_step(model, optimizer)
    assert save(c, model, optimizer, 2)
    newest = c.list()[-1]
    ckpt.verify(newest)  # verified (and remembered) before the damage: the damage must still be seen
    reason = damage(newest)

    found = ckpt.resolve_resume("auto", c)
    assert found == c.list()[0]
    assert_restores(found, good, accelerator)
    assert any(f"skipping checkpoint {newest}" in m and reason in m for m in launcher_log), launcher_log
    for explicit in (str(newest), str(tmp_path / "checkpoints" / "latest")):
        with pytest.raises(CheckpointError) as err:
            ckpt.resolve_resume(explicit, c)
        assert str(newest) in str(err.value) and reason in str(err.value)
        assert "--resume none to start fresh" in str(err.value)


def test_cli_skips_a_corrupted_newest_checkpoint_and_refuses_an_explicit_one(scratch, capsys):
    """Through the CLI: `--resume auto` warns, naming the corrupted checkpoint, and resumes from the one before;
    `--resume PATH` to the corrupted one exits 2 with one `error:` line, no traceback, and trains nothing."""
    recipe = tiny_recipe(scratch)
    code, out, err = cli(
        capsys, *train_args(recipe, scratch, "--max-steps", "20", "--checkpoint.every-steps", "10")
    )
    assert code == 0, out[-3000:] + err[-3000:]
    ckdir = scratch / "r" / "checkpoints"
    bad = ckdir / "step-00000020"
    flip_byte(bad)

    code, out, err = cli(capsys, *train_args(recipe, scratch, "--max-steps", "30", "--resume", str(bad)))
    assert code == 2
    assert err.startswith(f"error: --resume {bad}: {bad}: optimizer.pt does not match its checksum")
    assert "Traceback" not in err + out
    assert "resumed from" not in out and not (ckdir / "step-00000030").exists()

    code, out, err = cli(
        capsys, *train_args(recipe, scratch, "--max-steps", "30", "--checkpoint.every-steps", "10")
    )
    assert code == 0, out[-3000:] + err[-3000:]
    assert f"WARNING: skipping checkpoint {bad}: {bad}: optimizer.pt does not match its checksum" in out
    assert f"resumed from {ckdir / 'step-00000010'} at step 10" in out
    assert "done: step 30" in out
    ckpt.verify(ckdir / "step-00000030")


# ---- 3. full disk, read-only directory -----------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Any]:
    """mount(size) -> a fresh directory on a tmpfs of that many bytes (root and mount(8) needed; else skip)."""
    mounts: list[Path] = []

    def mount(where: Path, size: int) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs to fill up here ({result.stderr.strip() or 'mount failed'})")
        mounts.append(where)
        return where

    yield mount
    for where in reversed(mounts):
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_full_disk_and_read_only_directory(tmp_path, accelerator, launcher_log, small_tmpfs, mode):
    """A run directory on a small tmpfs. Filled up by another file, a save fails with ENOSPC: a clear error (or,
    tolerated, a warning and False), `latest` unchanged, the previous checkpoint intact, no leftovers; remounted
    read-only, the same with EROFS. Once space is back, the next save succeeds."""
    model, optimizer = make_model(width=128)
    probe = tmp_path / "probe"
    save(checkpointer(probe, accelerator), model, optimizer, 1)
    size = sum(p.stat().st_size for p in (probe / "checkpoints" / "step-00000001").iterdir())
    run = small_tmpfs(tmp_path / "run", size * 4)
    kw = {"async_save": mode == "async"}

    def attempt(c: ckpt.Checkpointer, step: int) -> bool:
        return save(c, model, optimizer, step) and c.wait()

    assert attempt(checkpointer(run, accelerator, **kw), 1)
    first = flat_state(model, optimizer)
    train_step(model, optimizer)
    free = os.statvfs(run).f_bavail * os.statvfs(run).f_frsize
    (run / "filler").write_bytes(b"\0" * (free - size // 2))  # room for half a checkpoint
    for failure, reason in (("full", "No space left on device"), ("read-only", "Read-only file system")):
        if failure == "read-only":
            remount(run, "ro")
        with pytest.raises(CheckpointError) as err:
            attempt(checkpointer(run, accelerator, **kw), 2)
        message = str(err.value)
        assert "could not save checkpoint step-00000002" in message and reason in message, message
        assert "`latest` still points to the last good one" in message
        launcher_log.clear()
        tolerant = ckpt.Checkpointer(run, accelerator, keep_last=1, tolerate_failures=True, **kw)
        assert attempt(tolerant, 2) is False
        assert any(reason in m and "training continues" in m for m in launcher_log), launcher_log
        assert names(run) == ["step-00000001"] and latest(run) == "step-00000001"
        assert_restores(run / "checkpoints" / "step-00000001", first, accelerator)
    remount(run, "rw")
    (run / "filler").unlink()
    assert attempt(checkpointer(run, accelerator, **kw), 2)
    assert names(run) == ["step-00000002"]
    assert_restores(run / "checkpoints" / "step-00000002", flat_state(model, optimizer), accelerator)


def test_file_size_limit_during_a_save(tmp_path):
    """RLIMIT_FSIZE in a real process (Python ignores SIGXFSZ, so writes fail with EFBIG): the save fails with a
    clear error, a tolerated one warns and returns False, an async one fails at wait(); the previous checkpoint
    is intact and nothing is left over."""
    result = run_driver("fsize", tmp_path)
    outcome = json.loads((tmp_path / "results.json").read_text())
    assert outcome["strict"].startswith("could not save checkpoint step-00000002")
    assert "File too large" in outcome["strict"] or "file write failed" in outcome["strict"], outcome
    assert outcome["tolerant"] is False
    assert "training continues because --checkpoint.tolerate-save-failures is set" in result.stderr
    assert outcome["async_save_returned"] is True
    assert outcome["async_wait"].startswith("could not save checkpoint step-00000004")
    run = tmp_path / "run"
    assert names(run) == ["step-00000001"] and latest(run) == "step-00000001"
    ckpt.verify(run / "checkpoints" / "step-00000001")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_cli_full_disk_stops_cleanly_or_continues_when_tolerated(tmp_path, small_tmpfs, capsys, mode):
    """The CLI with a checkpoint directory that has room for two and a half checkpoints: the third save fails, the
    run exits 2 with one `error:` line and no traceback, `latest` still names the second; rerun with
    --checkpoint.tolerate-save-failures, it resumes from there, warns at each failed save and finishes. With
    async_save the failure of step 30 surfaces at the next save (step 40), as an error all the same."""
    recipe = tiny_recipe(tmp_path)
    # The size of one checkpoint of the recipe's model, saved here the same way (state.json differs by a few
    # bytes; half a checkpoint of margin covers that).
    from launcher.recipe import load_recipe

    model = load_recipe(recipe).build_model(None)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 64)).sum().backward()
    optimizer.step()
    save(checkpointer(tmp_path / "probe", Accelerator(cpu=True)), model, optimizer, 10)
    AcceleratorState._reset_state(reset_partial_state=False)
    size = sum(p.stat().st_size for p in (tmp_path / "probe" / "checkpoints" / "step-00000010").iterdir())
    ckdir = small_tmpfs(tmp_path / "r" / "checkpoints", int(size * 2.5))
    args = ("--max-steps", "40", "--checkpoint.every-steps", "10", "--checkpoint.keep-last", "2")
    args += ("--checkpoint.async-save",) if mode == "async" else ()

    code, out, err = cli(capsys, *train_args(recipe, tmp_path, *args))
    assert code == 2, out[-3000:] + err[-3000:]
    assert err.startswith("error: could not save checkpoint step-00000030")
    assert "No space left on device" in err and "Traceback" not in out + err
    assert "done: step" not in out
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step-00000010", "step-00000020"]
    assert latest(tmp_path / "r") == "step-00000020"
    for name in ("step-00000010", "step-00000020"):
        ckpt.verify(ckdir / name)

    tolerated = subprocess.run(
        train_cmd(recipe, tmp_path, *args, "--checkpoint.tolerate-save-failures"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tolerated.returncode == 0, tolerated.stdout[-3000:] + tolerated.stderr[-3000:]
    assert f"resumed from {ckdir / 'step-00000020'} at step 20" in tolerated.stdout
    for step in (30, 40):
        assert f"could not save checkpoint step-000000{step}" in tolerated.stdout
    assert (
        tolerated.stdout.count("training continues because --checkpoint.tolerate-save-failures is set") == 2
    )
    assert "done: step 40" in tolerated.stdout
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step-00000010", "step-00000020"]
    assert latest(tmp_path / "r") == "step-00000020"


# ---- 4. rotation ---------------------------------------------------------------------------------------------
def test_rotation_never_deletes_the_best_checkpoint(tmp_path, accelerator):
    model, optimizer = make_model()
    c = checkpointer(tmp_path, accelerator, keep_last=1)
    for step in range(1, 6):
        save(c, model, optimizer, step, best_step=2 if step >= 2 else None)
    assert names(tmp_path) == ["step-00000002", "step-00000005"]
    save(c, model, optimizer, 6, best_step=6)  # a new best: the old best is now just old
    assert names(tmp_path) == ["step-00000006"]

    c = checkpointer(tmp_path, accelerator, keep_last=2)
    for step in range(7, 11):
        save(c, model, optimizer, step, best_step=7)
    assert names(tmp_path) == ["step-00000007", "step-00000009", "step-00000010"]
    for path in c.list():
        ckpt.verify(path)


def test_saving_an_earlier_step_supersedes_later_checkpoints_without_deleting_them(
    tmp_path, accelerator, launcher_log
):
    """A run resumed from an older checkpoint (or started with --resume none) in a directory that went further:
    its first save must be kept (keep-last 1 once deleted it, as older than the abandoned run's step 4), and the
    abandoned checkpoints must leave the way of `--resume auto`, without being deleted."""
    model, optimizer = make_model()
    c = checkpointer(tmp_path, accelerator, keep_last=1)
    for step in (1, 2, 3, 4):
        save(c, model, optimizer, step)
    abandoned = flat_state(model, optimizer)
    model, optimizer = make_model(seed=7)
    save(c, model, optimizer, 2)
    assert names(tmp_path) == ["step-00000002", "superseded"]
    assert ckpt.resolve_resume("auto", c) == tmp_path / "checkpoints" / "step-00000002"
    assert_restores(tmp_path / "checkpoints" / "step-00000002", flat_state(model, optimizer), accelerator)
    moved = sorted((tmp_path / "checkpoints" / "superseded").iterdir())
    assert [p.name.split(".")[0] for p in moved] == ["step-00000004"]
    assert_restores(moved[0], abandoned, accelerator)
    assert any("step-00000004" in m and "earlier run" in m for m in launcher_log)

    model, optimizer = make_model(seed=8)  # the same step again: the old one moves aside, never deleted first
    save(c, model, optimizer, 2)
    assert_restores(tmp_path / "checkpoints" / "step-00000002", flat_state(model, optimizer), accelerator)
    assert len(list((tmp_path / "checkpoints" / "superseded").iterdir())) == 2


def test_tied_weights_save_and_load(tmp_path, accelerator):
    """A model whose output layer shares the embedding's weight (safetensors refuses shared tensors as they are)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    model[1].weight = model[0].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.arange(10)).sum().backward()
    optimizer.step()
    c = checkpointer(tmp_path, accelerator)
    assert save(c, model, optimizer, 1)
    fresh = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    fresh[1].weight = fresh[0].weight
    ckpt.load(c.list()[0], fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), None, accelerator)
    assert torch.equal(fresh[0].weight, model[0].weight) and fresh[1].weight is fresh[0].weight


# ---- 5. strict schema ----------------------------------------------------------------------------------------
def remark(path: Path) -> None:
    """Rewrite COMPLETE for the files as they are now, computed here from the format's definition (CRC-32 per
    chunk), so that only the schema check can object."""
    chunk = ckpt.CHUNK_BYTES
    files = {}
    for p in sorted(path.iterdir()):
        if p.name == ckpt.MARKER:
            continue
        data = p.read_bytes()
        crcs = [f"{zlib.crc32(data[i : i + chunk]):08x}" for i in range(0, len(data), chunk)]
        files[p.name] = {"size": len(data), "crc32": crcs}
    manifest = json.loads((path / ckpt.MARKER).read_text())
    (path / ckpt.MARKER).write_text(json.dumps({**manifest, "files": files}))


def edit_state(path: Path, change: Any) -> None:
    record = json.loads((path / "state.json").read_text())
    change(record)
    (path / "state.json").write_text(json.dumps(record))
    remark(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "notes.txt").write_text("hi"), "unknown entry 'notes.txt'"),
        (lambda p: (p / "scaler.pt").write_bytes(b"x"), "entries not listed in COMPLETE: ['scaler.pt']"),
        (lambda p: ((p / "notes.txt").write_text("hi"), remark(p)), "unknown entry 'notes.txt'"),
        (lambda p: ((p / "optimizer.pt").unlink(), remark(p)), "missing ['optimizer.pt']"),
        (
            lambda p: ((p / "rng-00001.pt").write_bytes(b"x"), remark(p)),
            "RNG files ['rng-00001.pt'] are extra",
        ),
        (
            lambda p: edit_state(p, lambda r: r.update(foo=1)),
            "state.json has unknown entries ['foo'] / lacks []",
        ),
        (lambda p: edit_state(p, lambda r: r.pop("fingerprint")), "lacks ['fingerprint']"),
        (lambda p: edit_state(p, lambda r: r["state"].update(lr=0.1)), "'state' has unknown entries ['lr']"),
        (lambda p: edit_state(p, lambda r: r["state"].pop("best_step")), "lacks ['best_step']"),
        (
            lambda p: edit_state(p, lambda r: r.update(world_size=2)),
            "RNG files [] are extra / ['rng-00001.pt']",
        ),
        (lambda p: edit_state(p, lambda r: r["state"].update(step=9)), "state.json is for step 9"),
        (lambda p: edit_state(p, lambda r: r.update(format="other/1")), "format 'other/1'"),
    ],
)
def test_strict_schema_names_the_entry(tmp_path, accelerator, damage, message):
    c = checkpointer(tmp_path, accelerator)
    model, optimizer = make_model()
    save(c, model, optimizer, 1)
    path = c.list()[0]
    damage(path)
    with pytest.raises(CheckpointError) as err:
        ckpt.verify(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_format_1_checkpoint_is_refused_by_name_and_skipped_by_resume_auto(tmp_path, accelerator):
    """Format 1 (the same files, one sha256 each, before the CRC-32 marker) is no longer read: verifying one names
    its format, and `--resume auto` skips it for the newest checkpoint it can use."""
    c = checkpointer(tmp_path, accelerator, keep_last=2)
    model, optimizer = make_model()
    save(c, model, optimizer, 1)
    save(c, model, optimizer, 2)
    path = c.list()[-1]
    record = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**record, "format": "launcher-checkpoint/1"}))
    files = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(path.iterdir())
        if p.name != ckpt.MARKER
    }
    (path / ckpt.MARKER).write_text(
        json.dumps({"format": "launcher-checkpoint/1", "step": 2, "files": files})
    )
    with pytest.raises(
        CheckpointError, match=r"format 'launcher-checkpoint/1', expected 'launcher-checkpoint/2'"
    ):
        ckpt.verify(path)
    assert ckpt.resolve_resume("auto", c) == c.list()[0] == tmp_path / "checkpoints" / "step-00000001"


def test_marker_for_another_step_is_an_error(tmp_path, accelerator):
    c = checkpointer(tmp_path, accelerator)
    model, optimizer = make_model()
    save(c, model, optimizer, 1)
    renamed = tmp_path / "checkpoints" / "step-00000005"
    c.list()[0].rename(renamed)
    with pytest.raises(CheckpointError, match="its COMPLETE marker is for step 1"):
        ckpt.verify(renamed)


def test_check_compatible_names_what_changed(tmp_path, accelerator):
    def fingerprint(model: nn.Module, optimizer: str, batch: int) -> dict:
        return {
            "model": ckpt.model_fingerprint(model),
            "optimizer": optimizer,
            "global_batch": batch,
            "train_samples": 512,
        }

    model, optimizer = make_model(width=16)
    c = checkpointer(tmp_path, accelerator)
    c.save(
        model,
        optimizer,
        None,
        ckpt.TrainState(step=1),
        {"fingerprint": fingerprint(model, "adamw", 64), "config": {}},
    )
    record = ckpt.verify(c.list()[0])
    assert ckpt.check_compatible(record, fingerprint(model, "adamw", 64), c.list()[0]) == []
    wider = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16))
    problems = ckpt.check_compatible(record, fingerprint(wider, "sgd", 128), c.list()[0])
    assert problems == [
        "model parameters differ (3): 0.bias: [16] -> [32]; 0.weight: [16, 16] -> [32, 16]; "
        "1.weight: [16, 16] -> [16, 32]",
        "optimizer adamw -> sgd",
        "global_batch 64 -> 128",
    ]
    del record["fingerprint"]["global_batch"]
    assert ckpt.check_compatible(record, fingerprint(model, "adamw", 64), c.list()[0]) == [
        "the checkpoint does not record global_batch"
    ]


# ---- the CLI runs: a tiny recipe on synthetic data (starts in a second; the data path is not on trial here) -----
TINY_RECIPE = '''
"""Fault-test recipe: 512 random 8x8 "images", an MLP, AdamW."""
import torch
from torch import nn
from torch.utils.data import TensorDataset

from launcher.config import DataConfig, OptimConfig, TrainConfig
from launcher.recipe import Datasets

config = TrainConfig(
    max_epochs=1,
    eval_every_epochs=0,
    data=DataConfig(batch_size=8, eval_batch_size=128, download=False),
    optim=OptimConfig(name="adamw", lr=1e-3),
)


def build_model(cfg):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


def build_datasets(cfg):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (512, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (512,), generator=g)
    return Datasets(train=TensorDataset(x, y), eval=TensorDataset(x[:128], y[:128]))
'''


def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.py"
    path.write_text(TINY_RECIPE)
    return path


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """`launcher.train` in this process, as the command line runs it: exit status, stdout, stderr. (In-process
    saves a second of imports per run; the SIGKILL test needs a real process and runs `train_cmd`.)"""
    from launcher.train import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def train_cmd(recipe: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.train", *train_args(recipe, out, *args)]


def train_args(recipe: Path, out: Path, *args: str) -> list[str]:
    return [
        str(recipe),
        "--output-dir",
        str(out),
        "--run-name",
        "r",
        "--logging.no-progress-bar",
        "--logging.trackers",
        *args,
    ]


# ---- the driver (this file run as a script) ------------------------------------------------------------------
def _write_expected(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    save_file(flat_state(model, optimizer), path)


def _link_copy(src: Path, dst: Path) -> None:
    # Hard links: checkpoint files are never modified in place, only created, renamed and deleted.
    shutil.copytree(src, dst, copy_function=os.link)


def _child(body: Any) -> int:
    """Fork; the child runs body() and exits 0 (1 on an exception). Returns the child's pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            body()
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return pid


def _driver_sweep(out: Path, async_save: bool) -> None:
    accelerator = Accelerator(cpu=True)
    model, optimizer = make_model(width=64, depth=3)
    base = out / "base"
    save(checkpointer(base, accelerator), model, optimizer, 1)
    _write_expected(out / "expected-1.safetensors", model, optimizer)
    train_step(model, optimizer)
    _write_expected(out / "expected-2.safetensors", model, optimizer)

    def attempt(run: Path, kill_before: int | None) -> int:
        _link_copy(base, run)
        prefix = str(run) + os.sep

        def body() -> None:
            events: list[list[str]] = []

            def hook(event: str, args: tuple) -> None:
                # Hashing and fsync threads only read and flush: a process killed there loses nothing more.
                if event not in WATCHED or threading.current_thread().name.startswith(
                    ("ckpt-hash", "ckpt-sync")
                ):
                    return
                arity = 2 if event == "os.rename" else 1  # open's second argument is its mode
                paths = [os.fsdecode(a) for a in args[:arity] if isinstance(a, (str, bytes, os.PathLike))]
                if not paths or not paths[0].startswith(prefix):
                    return
                if len(events) == kill_before:
                    os.kill(os.getpid(), signal.SIGKILL)
                events.append([event, *(os.path.relpath(p, run) for p in paths)])

            sys.addaudithook(hook)
            c = checkpointer(run, accelerator, async_save=async_save)
            save(c, model, optimizer, 2)
            c.wait()
            if kill_before is None:
                (out / "events.json").write_text(json.dumps(events))

        _, status = os.waitpid(_child(body), 0)
        return status

    results = [{"k": None, "run": str(out / "nokill"), "status": attempt(out / "nokill", None)}]
    events = json.loads((out / "events.json").read_text())
    for k in range(len(events)):
        run = out / f"kill-{k:02d}"
        results.append({"k": k, "run": str(run), "status": attempt(run, k)})
    (out / "results.json").write_text(json.dumps(results))


def _progress(tmp: Path, target: str) -> tuple[str, int] | None:
    """(file, bytes written so far) of the file that will become `target` in the checkpoint directory `tmp`."""
    try:
        if target != "model.safetensors":
            return target, (tmp / target).stat().st_size
        # safetensors writes a temporary `.tmpXXXXXX` of the final size (ftruncate), then renames it: count the
        # blocks actually written.
        for path in tmp.iterdir():
            if path.name.startswith(".tmp") or path.name == target:  # safetensors < 0.8 writes it in place
                return path.name, path.stat().st_blocks * 512
    except FileNotFoundError:
        pass
    return None


def _driver_midwrite(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    model, optimizer = make_model(width=2048, depth=2)  # 34 MB of weights, 67 MB of AdamW state
    base = out / "base"
    save(checkpointer(base, accelerator), model, optimizer, 1)
    _write_expected(out / "expected-1.safetensors", model, optimizer)
    train_step(model, optimizer)
    results = []
    for target in ("optimizer.pt", "model.safetensors"):
        full = (base / "checkpoints" / "step-00000001" / target).stat().st_size
        for attempt in range(
            10
        ):  # each file takes tens of milliseconds to write: polling nearly always sees it
            run = out / f"{target}-{attempt}"
            _link_copy(base, run)
            tmp = run / "checkpoints" / ".tmp-step-00000002"
            pid = _child(lambda run=run: save(checkpointer(run, accelerator), model, optimizer, 2))
            caught = None
            while caught is None:
                seen = _progress(tmp, target)
                if seen is not None and 0 < seen[1] < full // 2:
                    os.kill(pid, signal.SIGKILL)
                    caught = seen
                elif os.waitpid(pid, os.WNOHANG)[0]:
                    break
            if caught is not None:
                _, status = os.waitpid(pid, 0)
                results.append(
                    {
                        "target": target,
                        "run": str(run),
                        "status": status,
                        "partial": caught[0],
                        "written_at_kill": caught[1],
                        "full_size": full,
                    }
                )
                break
            shutil.rmtree(run)
        else:
            raise AssertionError(f"never caught {target} half written in 10 attempts")
    (out / "results.json").write_text(json.dumps(results))


def _driver_fsize(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    model, optimizer = make_model(width=256)
    run = out / "run"
    save(checkpointer(run, accelerator), model, optimizer, 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))  # the optimizer state is 0.5 MB
    outcome: dict[str, Any] = {}
    try:
        save(checkpointer(run, accelerator), model, optimizer, 2)
        outcome["strict"] = "no error"
    except CheckpointError as exc:
        outcome["strict"] = str(exc)
    tolerant = ckpt.Checkpointer(run, accelerator, keep_last=1, tolerate_failures=True)
    outcome["tolerant"] = save(tolerant, model, optimizer, 3)
    background = checkpointer(run, accelerator, async_save=True)
    outcome["async_save_returned"] = save(background, model, optimizer, 4)
    try:
        background.wait()
        outcome["async_wait"] = "no error"
    except CheckpointError as exc:
        outcome["async_wait"] = str(exc)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    (out / "results.json").write_text(json.dumps(outcome))


def _driver_ranks(out: Path) -> None:
    """One of two ranks (RANK, WORLD_SIZE, MASTER_* in the environment): saves that succeed, and saves for which
    rank 1 cannot write its RNG file, synchronous and async_save."""
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    model, optimizer = accelerator.prepare(*make_model())
    run = out / "run"
    outcome: dict[str, list[Any]] = {}

    def failing_save(c: ckpt.Checkpointer, step: int) -> str:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if rank == 1:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))  # its RNG file is 16 KB
        try:
            save(c, model, optimizer, step)
            c.wait()
            return "no error"
        except CheckpointError as exc:
            return str(exc)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    sync = checkpointer(run, accelerator, keep_last=2)
    outcome["sync"] = [save(sync, model, optimizer, 1), failing_save(sync, 2)]
    background = checkpointer(run, accelerator, keep_last=2, async_save=True)
    ok = save(background, model, optimizer, 3) and background.wait()
    outcome["async"] = [ok, failing_save(background, 4)]
    (out / f"rank-{rank}.json").write_text(json.dumps(outcome))
    accelerator.end_training()


if __name__ == "__main__":
    torch.set_num_threads(1)  # the driver forks: no intra-op thread pool may be running
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    if mode == "sweep":
        _driver_sweep(out_dir, "--async" in sys.argv)
    elif mode == "midwrite":
        _driver_midwrite(out_dir)
    elif mode == "fsize":
        _driver_fsize(out_dir)
    elif mode == "ranks":
        _driver_ranks(out_dir)
        # Under load, interpreter shutdown after a gloo process group sometimes aborts in C++ ("terminate called
        # without an active exception"), with or without the checkpointer's own group: skip the finalisation.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    else:
        sys.exit(f"unknown mode {mode!r}")
