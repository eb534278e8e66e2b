"""Shared fixtures: the real MNIST digits, and helpers that run the trainer in-process or under accelerate."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
MNIST_MINI = REPO.parent / "shared" / "data" / "mnist-mini"
TEST_RECIPES = Path(__file__).resolve().parent / "recipes"


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    if not (MNIST_MINI / "MNIST" / "raw").is_dir():
        pytest.fail(f"the real-digit fixture {MNIST_MINI} is missing (it lives in ../shared beside the repo)")
    return MNIST_MINI


def run_args(recipe: Path, out: Path, name: str, data_root: Path, *extra: str | Path) -> list[str | Path]:
    """The arguments every test run shares: its recipe and data, its run directory, no progress bar."""
    return [recipe, "--data.root", data_root, "--output-dir", out, "--run-name", name, "--logging.no-progress-bar",
            *extra]  # fmt: skip


def train(*args: str | Path) -> int:
    """Run `launcher.train` in this process (one process, CPU); returns its exit status."""
    from launcher.train import main

    return main([str(a) for a in args])


def accelerate_cmd(processes: int, *args: str | Path, module: bool = True) -> list[str]:
    """`accelerate launch [-m launcher.train] ARGS` with `processes` ranks (gloo on CPU with ACCELERATE_USE_CPU=1)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port())]  # fmt: skip
    cmd += ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    return cmd + (["-m", "launcher.train"] if module else []) + [str(a) for a in args]


def accelerate_launch(
    processes: int, *args: str | Path, timeout: int = 600, check: bool = True, module: bool = True
):
    """Run `accelerate launch` with `processes` gloo ranks on CPU, as a user would."""
    cmd = accelerate_cmd(processes, *args, module=module)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run_dir: Path, kind: str | None = None) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((run_dir / "checkpoints" / "latest").read_text())["checkpoint"]
    return load_file(run_dir / "checkpoints" / latest / "model.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), (
                f"{key} differs (max {(a[key] - b[key]).abs().max().item():.3g})"
            )
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, found by parent PID in /proc: also those in other sessions and process groups
    (`accelerate launch` starts its workers in new sessions, where killpg of the launcher's group misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the command name may hold spaces
        except (OSError, IndexError, ValueError):
            continue  # it exited while we looked
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and all its descendants, each by PID. They are stopped first, until no new one appears, so
    that none starts another between the listing and the kill, and none is reparented out of sight when its
    parent dies first."""
    stopped: set[int] = set()
    while new := ({pid} | descendants(pid)) - stopped:
        for p in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGSTOP)
        stopped |= new
    for p in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
