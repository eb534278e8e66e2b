"""Real 2-process runs (gloo on CPU) for what only several ranks show: a signal that reaches one rank, a recipe that
splits its data with the global RNG, a checkpoint chosen once, an error on one rank, launches that would not train
what they seem to, --compile's wrapping order, and an evaluation share that is empty.

2-process launches take 20-40 s here, mostly imports: each test launches as few as it can.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (
    REPO,
    TEST_RECIPES,
    accelerate_cmd,
    accelerate_launch,
    assert_same_tensors,
    descendants,
    final_weights,
    metrics,
    run_args,
    train,
)

SPLIT = TEST_RECIPES / "split.py"
MLP = TEST_RECIPES / "mlp.py"
pytestmark = pytest.mark.slow
# A streamed evaluation set of one digit: rank 1's share is empty.
ARGS = ("--data.no-in-memory", "--data.num-workers", "0", "--split.eval-samples", "1", "--schedule.decay",
        "constant", "--checkpoint.every-steps", "10", "--checkpoint.keep-last", "3", "--checkpoint.every-epochs",
        "0", "--eval-every-epochs", "0", "--logging.every-steps", "10")  # fmt: skip


def worker_of_rank(launcher_pid: int, rank: int) -> int:
    for pid in descendants(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"launcher.train" in cmdline:
            return pid
    raise AssertionError(f"no worker of rank {rank} under {launcher_pid}")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, mnist_root) -> tuple[Path, int, str]:
    """A 2-process run of which only rank 1 receives SIGUSR1, after its checkpoint of step 20."""
    out = tmp_path_factory.mktemp("ranks")
    args = run_args(SPLIT, out, "two", mnist_root, *ARGS, "--data.batch-size", "32", "--max-steps", "100000")
    proc = subprocess.Popen(accelerate_cmd(2, *args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})  # fmt: skip
    marker = out / "two" / "checkpoints" / "step-00000020" / "COMPLETE"
    deadline = time.time() + 180
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "timed out waiting for the checkpoint of step 20"
        time.sleep(0.05)
    os.kill(worker_of_rank(proc.pid, 1), signal.SIGUSR1)
    output, _ = proc.communicate(timeout=180)
    return out, proc.returncode, output


def test_a_signal_to_one_rank_stops_both_at_the_same_step_after_one_checkpoint(stopped):
    out, returncode, output = stopped
    assert returncode != 0, output[-3000:]  # the workers exit with EXIT_PREEMPTED (3)
    run_dir = out / "two"
    step = json.loads((run_dir / "checkpoints" / "latest").read_text())["step"]
    # The ranks agree every --preemption.check-every-steps (10) steps: at step 20 already, if the signal came
    # before that check, or at a later one.
    assert step % 10 == 0 and step >= 20
    assert (
        f"stopped by a signal to another process at step {step} after saving"
        in (run_dir / "train.log").read_text()
    )
    saved = sorted(p.name for p in (run_dir / "checkpoints" / f"step-{step:08d}").iterdir())
    assert {"rng-00000.pt", "rng-00001.pt", "COMPLETE"} <= set(saved)


def test_resume_chooses_the_checkpoint_once_and_equals_one_process_on_a_random_split(stopped, mnist_root):
    out, _, _ = stopped
    run_dir = out / "two"
    step = json.loads((run_dir / "checkpoints" / "latest").read_text())["step"]
    weights = run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # corrupt the newest checkpoint: the resume must skip it, saying so once
    weights.write_bytes(bytes(data))
    length = ("--max-steps", str(step + 10))
    args = run_args(SPLIT, out, "two", mnist_root, *ARGS, "--data.batch-size", "32", *length)
    result = accelerate_launch(2, *args)
    output = result.stdout + result.stderr
    assert output.count(f"skipping checkpoint {run_dir / 'checkpoints' / f'step-{step:08d}'}") == 1, output[
        -3000:
    ]
    assert metrics(run_dir, "setup")[-1]["resumed_from"].endswith(f"step-{step - 10:08d}")
    # The same random split on both ranks (seeded alike while the recipe builds its data): 2 x 32 == 1 x 64.
    assert train(*run_args(SPLIT, out, "one", mnist_root, *ARGS, "--data.batch-size", "64", *length)) == 0
    assert_same_tensors(final_weights(out / "one"), final_weights(run_dir), atol=2e-6)
    two, one = metrics(run_dir, "final")[-1], metrics(out / "one", "final")[-1]
    assert two["samples"] == one["samples"] == 1 and two["loss"] == pytest.approx(one["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def refused(tmp_path_factory, mnist_root) -> dict[str, tuple[subprocess.CompletedProcess, float, Path]]:
    """Three launches that must stop with a message, run side by side (each is mostly imports, one core each):
    a data path missing on rank 1 only, plain torchrun on CPU, and an accelerate config that selects FSDP."""
    out = tmp_path_factory.mktemp("refused")
    cpu = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    fsdp = accelerate_cmd(1, *run_args(MLP, out, "fsdp", mnist_root, "--max-steps", "5"))
    fsdp.insert(fsdp.index("accelerate.commands.launch") + 1, "--use_fsdp")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "launcher.train",
                *map(str, run_args(MLP, out, "torchrun", mnist_root, "--max-steps", "5"))]  # fmt: skip
    missing = accelerate_cmd(2, *run_args(SPLIT, out, "missing", mnist_root, "--max-steps", "5"))
    launches = {
        "missing": (missing, cpu | {"SPLIT_MISSING_DATA_RANK": "1"}),
        "torchrun": (torchrun, {k: v for k, v in cpu.items() if k != "ACCELERATE_USE_CPU"}),
        "fsdp": (fsdp, cpu),
    }
    start = time.time()
    procs = {name: subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, (cmd, env) in launches.items()}  # fmt: skip
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), time.time() - start,
                         out / name)  # fmt: skip
    return results


def test_an_error_on_one_rank_is_reported_by_that_rank_and_stops_both(refused):
    result, seconds, run_dir = refused["missing"]
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "[rank 1] error: MNIST not found" in output, output[-3000:]
    assert (
        "[rank 0] error" not in output and seconds < 180
    )  # nobody waits for a collective's 30-minute timeout
    assert not run_dir.exists()  # a failed start leaves no run directory


def test_plain_torchrun_on_cpu_is_refused(refused):
    result, _, run_dir = refused["torchrun"]
    assert result.returncode != 0
    assert "2 processes were started (WORLD_SIZE=2) but they do not form one process group" in result.stderr
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu" in result.stderr
    assert not (run_dir / "checkpoints").exists()


def test_an_fsdp_accelerate_config_is_refused(refused):
    result, _, _ = refused["fsdp"]
    assert result.returncode != 0
    assert (
        "the accelerate configuration selects FSDP, which this launcher does not drive yet" in result.stderr
    )


def test_compile_wraps_ddp_and_an_empty_evaluation_share_counts_nothing(tmp_path, mnist_root):
    out = tmp_path / "found.json"
    accelerate_launch(2, REPO / "tests" / "scripts" / "two_rank_checks.py", out, mnist_root, module=False)
    found = json.loads(out.read_text())
    assert found["processes"] == 2
    assert found["prepared"] == "OptimizedModule" and found["inside_is_ddp"], found
    for path in ("in_memory=True", "in_memory=False"):
        assert (
            found[path]["samples"] == 1
            and found[path]["confusion_sum"] == 1
            and found[path]["shape"] == [10, 10]
        )
        assert found[path]["loss"] == pytest.approx(found["direct_loss"], rel=1e-5)
