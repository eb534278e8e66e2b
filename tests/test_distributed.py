"""Real multi-process DDP (gloo on CPU, through `accelerate launch`): equivalences and one run directory."""

from __future__ import annotations

import json
import sys

import pytest
from safetensors.torch import load_file

from conftest import (
    REPO,
    TEST_RECIPES,
    accelerate_launch,
    assert_same_tensors,
    final_weights,
    metrics,
    run_args,
    train,
)

MLP = TEST_RECIPES / "mlp.py"
pytestmark = pytest.mark.slow


def mlp_args(out, name, mnist_root, *extra):
    return run_args(MLP, out, name, mnist_root, "--eval-every-epochs", "0", *extra)


def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, mnist_root):
    accelerate_launch(
        2, *mlp_args(tmp_path, "ddp", mnist_root, "--data.batch-size", "32", "--max-steps", "40")
    )
    accelerate_launch(
        1, *mlp_args(tmp_path, "one", mnist_root, "--data.batch-size", "64", "--max-steps", "40")
    )
    assert metrics(tmp_path / "ddp", "setup")[0]["processes"] == 2
    assert_same_tensors(final_weights(tmp_path / "ddp"), final_weights(tmp_path / "one"), atol=2e-6)
    # Evaluation over uneven shards (2000 digits in batches of 300 per rank) counts every digit once.
    assert metrics(tmp_path / "ddp", "final")[0]["samples"] == 2000


def test_accumulation_skips_the_all_reduce_of_non_final_micro_batches(tmp_path, mnist_root):
    counts = {}
    for accum in (1, 4):
        out = tmp_path / f"count{accum}.json"
        args = mlp_args(
            tmp_path, f"a{accum}", mnist_root, "--max-steps", "12", "--grad-accum-steps", str(accum)
        )
        accelerate_launch(2, REPO / "tests" / "scripts" / "count_allreduce.py", out, *args, module=False)
        counts[accum] = json.loads(out.read_text())["allreduce"]
    # The MLP's gradients fit in one DDP bucket: one all-reduce per optimizer step, whatever the accumulation
    # (48 micro-batches with accumulation 4 still give 12).
    assert counts == {1: 12, 4: 12}


def test_two_process_mnist_run_leaves_one_run_directory_whose_metrics_the_test_phase_reproduces(
    tmp_path, mnist_root
):
    result = accelerate_launch(
        2,
        REPO / "recipes" / "mnist.py",
        "--data.root",
        mnist_root,
        "--output-dir",
        tmp_path,
        "--max-steps",
        "10",
        "--logging.no-progress-bar",
    )
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1, runs  # ranks agreed on one (timestamped) name
    run = runs[0]
    assert result.stdout.count("done: step") == 1  # only the main process prints
    assert (run / "train.log").read_text().count("done: step") == 1
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*/rng-*.pt"))[:2] == [
        "rng-00000.pt",
        "rng-00001.pt",
    ]
    final = metrics(run, "final")[0]
    latest = json.loads((run / "checkpoints" / "latest").read_text())["checkpoint"]
    weights = run / "checkpoints" / latest / "model.safetensors"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in load_file(weights))
    assert (
        train(
            REPO / "recipes" / "mnist.py",
            "--phase",
            "test",
            "--weights",
            weights,
            "--data.root",
            mnist_root,
            "--output-dir",
            tmp_path / "test",
            "--run-name",
            "t",
        )
        == 0
    )
    tested = metrics(tmp_path / "test" / "t", "test")[0]
    assert tested["accuracy"] == final["accuracy"] and tested["samples"] == final["samples"] == 2000
    assert tested["loss"] == pytest.approx(final["loss"], rel=1e-6)


@pytest.mark.skipif(sys.platform != "linux", reason="torch.compile on CPU needs a C++ toolchain")
def test_compile_keeps_checkpoint_keys_clean(tmp_path, mnist_root):
    assert train(*mlp_args(tmp_path, "c", mnist_root, "--compile", "--max-steps", "3")) == 0
    weights = final_weights(tmp_path / "c")
    assert weights and not any("_orig_mod" in k or k.startswith("module.") for k in weights)
    assert load_file(tmp_path / "c" / "best.safetensors").keys() == weights.keys()
