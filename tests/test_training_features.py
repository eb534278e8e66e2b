"""Training features as equivalences: accumulation == big batch, launcher == plain PyTorch loop, bf16, fp16."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torchvision.datasets import MNIST

from conftest import TEST_RECIPES, assert_same_tensors, final_weights, metrics, run_args, train
from launcher.data import epoch_order
from launcher.recipe import load_recipe

MLP = TEST_RECIPES / "mlp.py"


def run_mlp(tmp_path, name: str, mnist_root, *args) -> dict[str, torch.Tensor]:
    code = train(*run_args(MLP, tmp_path, name, mnist_root, "--eval-every-epochs", "0", *args))
    assert code == 0
    return final_weights(tmp_path / name)


def test_accumulation_equals_the_big_batch(tmp_path, mnist_root):
    big = run_mlp(tmp_path, "big", mnist_root, "--data.batch-size", "64", "--max-steps", "60")
    acc = run_mlp(
        tmp_path, "acc", mnist_root, "--data.batch-size", "32", "--grad-accum-steps", "2", "--max-steps", "60"
    )
    assert_same_tensors(big, acc, atol=2e-6)
    assert metrics(tmp_path / "acc", "setup")[0]["global_batch"] == 64


def test_shorter_last_window_equals_the_shorter_last_batch(tmp_path, mnist_root):
    """8000 digits in micro-batches of 32 and windows of 3: the epoch's last window has 2 micro-batches (64
    samples), which must weigh like the last batch of 64 when training with batches of 96."""
    common = ["--data.no-drop-last", "--max-epochs", "1"]
    big = run_mlp(tmp_path, "big", mnist_root, "--data.batch-size", "96", *common)
    acc = run_mlp(tmp_path, "acc", mnist_root, "--data.batch-size", "32", "--grad-accum-steps", "3", *common)
    setup = metrics(tmp_path / "acc", "setup")[0]
    assert setup["steps_per_epoch"] == 84 and setup["total_steps"] == 84  # 250 micro-batches = 83 x 3 + 1
    assert_same_tensors(big, acc, atol=2e-6)


def test_launcher_equals_a_plain_pytorch_loop(tmp_path, mnist_root):
    """Same model init, data order, SGD + nesterov + weight decay, warm-up + cosine, gradient clipping."""
    args = [
        "--optim.nesterov",
        "--optim.weight-decay",
        "1e-4",
        "--optim.grad-clip-norm",
        "0.5",
        "--max-steps",
        "50",
        "--logging.every-steps",
        "10",
    ]
    launcher_weights = run_mlp(tmp_path, "l", mnist_root, *args)

    recipe = load_recipe(MLP)
    cfg = recipe.default
    torch.manual_seed(cfg.seed)
    model = recipe.build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    data = MNIST(mnist_root, train=True)
    images, labels = (data.data.float()[:, None] / 255.0 - 0.1307) / 0.3081, data.targets
    order = epoch_order(len(data), cfg.seed, 0, shuffle=True)
    total, warmup = 50, 10
    norms = []
    for step in range(total):
        if step < warmup:
            factor = 0.1 + 0.9 * step / warmup
        else:
            factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        for group in opt.param_groups:
            group["lr"] = 0.05 * factor
        idx = order[step * 32 : (step + 1) * 32]
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5).item())
        opt.step()
    assert_same_tensors(launcher_weights, dict(model.state_dict()), atol=1e-6)
    logged = {r["step"]: r["grad_norm"] for r in metrics(tmp_path / "l", "train")}
    assert logged[10] == pytest.approx(norms[9], rel=1e-5) and logged[50] == pytest.approx(
        norms[49], rel=1e-5
    )


def test_bf16_forward_really_runs_in_bf16(tmp_path, mnist_root):
    run_mlp(tmp_path, "bf16", mnist_root, "--mixed-precision", "bf16", "--max-steps", "5")
    seen = sys.modules["launcher_recipe_mlp"].SEEN_DTYPES
    assert torch.bfloat16 in seen and torch.float32 not in seen, seen  # eval ran under autocast too
    run_mlp(tmp_path, "fp32", mnist_root, "--max-steps", "5")
    assert {torch.float32} == sys.modules["launcher_recipe_mlp"].SEEN_DTYPES


def test_bf16_training_tracks_fp32(tmp_path, mnist_root):
    """One epoch of the MLP (250 steps) in fp32 and in bf16 autocast, same seed and data order: the Linear layers
    really ran in bf16 (so the runs do differ), and bf16 tracks fp32: the same loss in the first 50 steps, the mean
    training loss and the held-out accuracy close. The tolerances are about twice the largest differences
    measured over seeds 0-5 on a CPU without native bf16 (first 50 steps 0.7%, mean loss 3.2%, accuracy 0.55
    points, bf16 always the lower). The full-accuracy comparison, the CNN recipe's 3 epochs, is
    `python -m benchmarks.bf16_accuracy` (docs/benchmarks.md): minutes with emulated bf16, too long for the suite."""
    runs = {}
    for precision in ("no", "bf16"):
        run_mlp(tmp_path, precision, mnist_root, "--mixed-precision", precision, "--max-epochs", "1",
                "--logging.every-steps", "10")  # fmt: skip
        seen = sys.modules["launcher_recipe_mlp"].SEEN_DTYPES
        assert seen == ({torch.bfloat16} if precision == "bf16" else {torch.float32}), (precision, seen)
        losses = [r["loss"] for r in metrics(tmp_path / precision, "train")]
        assert len(losses) == 25
        runs[precision] = (losses, metrics(tmp_path / precision, "final")[0]["accuracy"])
    (fp32, fp32_accuracy), (bf16, bf16_accuracy) = runs["no"], runs["bf16"]
    assert fp32 != bf16  # bf16 rounding changed something
    assert sum(bf16[:5]) == pytest.approx(sum(fp32[:5]), rel=0.015)
    assert sum(bf16) == pytest.approx(sum(fp32), rel=0.06)
    assert fp32_accuracy >= 0.92 and abs(bf16_accuracy - fp32_accuracy) <= 0.01, runs


def test_fp16_on_cpu_says_it_trains_in_fp32(tmp_path, mnist_root, capsys):
    run_mlp(tmp_path, "fp16", mnist_root, "--mixed-precision", "fp16", "--max-steps", "2")
    out = capsys.readouterr().out
    assert "--mixed-precision fp16 needs a GPU" in out and "trains in fp32" in out
    assert "fp16 needs a GPU" in (tmp_path / "fp16" / "train.log").read_text()
    assert metrics(tmp_path / "fp16", "setup")[0]["mixed_precision"] == "no"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a grad scaler needs a CUDA GPU")
def test_fp16_on_gpu_uses_a_scaler_saved_in_checkpoints(tmp_path, mnist_root):
    run_mlp(tmp_path, "fp16", mnist_root, "--mixed-precision", "fp16", "--max-steps", "20")
    ckpts = sorted((tmp_path / "fp16" / "checkpoints").glob("step-*"))
    scaler = torch.load(ckpts[-1] / "scaler.pt", weights_only=True)
    assert scaler["scale"] > 0 and {torch.float16} <= sys.modules["launcher_recipe_mlp"].SEEN_DTYPES


def test_seed_and_deterministic_switch(tmp_path, mnist_root):
    a = run_mlp(tmp_path, "a", mnist_root, "--max-steps", "5", "--seed", "3", "--deterministic")
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    b = run_mlp(tmp_path, "b", mnist_root, "--max-steps", "5", "--seed", "3")
    assert not torch.are_deterministic_algorithms_enabled()
    c = run_mlp(tmp_path, "c", mnist_root, "--max-steps", "5", "--seed", "4")
    assert_same_tensors(a, b)  # same seed: same init, order and weights
    assert not torch.equal(a["1.weight"], c["1.weight"])
