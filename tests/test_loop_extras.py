"""Early stopping, ReduceLROnPlateau and EMA: unit tests of the pieces and short real runs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import TEST_RECIPES, metrics, run_args, train
from launcher.config import ScheduleConfig
from launcher.ema import EMA
from launcher.schedules import Plateau

MLP = TEST_RECIPES / "mlp.py"


def run(tmp_path, mnist_root, name, *args):
    return train(*run_args(MLP, tmp_path, name, mnist_root, *args))


def test_early_stopping_triggers_after_patience_evaluations_without_improvement(tmp_path, mnist_root):
    # lr ~ 0: the weights, hence the accuracy, never change, so evaluations 2, 3 bring no improvement.
    assert (
        run(
            tmp_path,
            mnist_root,
            "es",
            "--optim.lr",
            "1e-12",
            "--max-steps",
            "200",
            "--eval-every-steps",
            "10",
            "--early-stopping.patience",
            "2",
        )
        == 0
    )
    evals = metrics(tmp_path / "es", "eval")
    assert [e["step"] for e in evals] == [10, 20, 30]
    stop = metrics(tmp_path / "es", "early_stop")
    assert stop == [{"kind": "early_stop", "step": 30, "epoch": stop[0]["epoch"], "stale_evals": 2}]
    assert metrics(tmp_path / "es", "final")[0]["step"] == 30
    assert "early stopping at step 30" in (tmp_path / "es" / "train.log").read_text()


def test_plateau_multiplier_follows_torchs_reduce_lr_on_plateau():
    cfg = ScheduleConfig(
        decay="plateau", gamma=0.5, plateau_patience=1, plateau_threshold=0.0, min_lr_factor=0.1
    )
    plateau = Plateau(cfg, mode="max")
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
        mode="max",
        factor=0.5,
        patience=1,
        threshold=0.0,
        min_lr=0.1,
    )
    scales = []
    for metric in [0.5, 0.6, 0.6, 0.6, 0.55, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]:
        plateau.step(metric)
        reference.step(metric)
        scales.append(plateau.scale)
        assert plateau.scale == reference.optimizer.param_groups[0]["lr"]
    assert scales[:5] == [1.0, 1.0, 1.0, 0.5, 0.5] and scales[-1] == 0.1  # floored at min_lr_factor
    again = Plateau(cfg, mode="max")
    again.load_state_dict(plateau.state_dict())
    plateau.step(0.7)
    again.step(0.7)
    assert again.state_dict() == plateau.state_dict()


def test_plateau_lowers_the_lr_of_a_real_run(tmp_path, mnist_root):
    assert (
        run(
            tmp_path,
            mnist_root,
            "p",
            "--optim.lr",
            "1e-12",
            "--max-steps",
            "40",
            "--eval-every-steps",
            "10",
            "--schedule.decay",
            "plateau",
            "--schedule.plateau-patience",
            "1",
            "--schedule.gamma",
            "0.5",
            "--schedule.warmup",
            "none",
            "--logging.every-steps",
            "1",
        )
        == 0
    )
    lr = {r["step"]: r["lr"] for r in metrics(tmp_path / "p", "train")}
    # Evaluations at 10 (best), 20 (1 bad), 30 (2 bad > patience: halve). The lr at step N is the N-th update's:
    # the 30th ran before the evaluation of step 30, the 31st after it. (abs=0: pytest.approx's default absolute
    # tolerance, 1e-12, applies even beside rel= and would call 1e-12 and 0.5e-12 equal.)
    exact = {"rel": 1e-9, "abs": 0}
    assert lr[30] == pytest.approx(1e-12, **exact) and lr[31] == pytest.approx(0.5e-12, **exact)


def test_ema_matches_a_hand_computed_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9, warmup_steps=4)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(5, 3))  # moves BatchNorm's running statistics and its counter
        ema.update(step)
        d = 0.9 * min(1.0, step / 4)
        for key, value in model.state_dict().items():
            expected[key] = (
                d * expected[key] + (1 - d) * value if value.is_floating_point() else value.clone()
            )
    for key, value in ema.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)
    assert ema.state_dict()["1.num_batches_tracked"].item() == 6


def test_a_tied_weight_is_averaged_once_per_step():
    """An embedding tied to the output layer is one tensor under two names: one lerp per step, not two (which
    would square its decay). The one-process side of the FSDP moving-average test found it."""
    embed = nn.Embedding(4, 3)
    head = nn.Linear(3, 4, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    ema = EMA(model, decay=0.5, warmup_steps=0)
    before = embed.weight.detach().clone()
    with torch.no_grad():
        embed.weight.add_(1.0)
    ema.update(0)
    torch.testing.assert_close(ema.state_dict()["embed.weight"], before + 0.5, rtol=0, atol=1e-6)
    averaged = ema.state_dict()
    assert averaged["head.weight"].data_ptr() == averaged["embed.weight"].data_ptr()  # still tied


def test_ema_is_evaluated_and_saved_beside_the_raw_weights(tmp_path, mnist_root):
    assert (
        run(
            tmp_path,
            mnist_root,
            "e",
            "--max-steps",
            "60",
            "--ema.decay",
            "0.9",
            "--ema.warmup-steps",
            "10",
            "--key-metric",
            "ema_accuracy",
        )
        == 0
    )
    final = metrics(tmp_path / "e", "final")[0]
    assert {"ema_accuracy", "ema_loss", "accuracy", "loss"} <= final.keys()
    ema = load_file(tmp_path / "e" / "ema.safetensors")
    raw = load_file(tmp_path / "e" / "checkpoints" / "step-00000060" / "model.safetensors")
    assert ema.keys() == raw.keys() and not all(torch.equal(ema[k], raw[k]) for k in ema)
    # One evaluation (at the end, step 60), chosen by ema_accuracy: best.safetensors holds the EMA weights.
    assert final["best_step"] == 60 and final["best_ema_accuracy"] == final["ema_accuracy"]
    best = load_file(tmp_path / "e" / "best.safetensors")
    assert all(torch.equal(best[k], ema[k]) for k in ema)
