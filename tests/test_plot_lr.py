"""`launcher plot-lr`: the drawn schedule is the schedule the run would use, and the PNG is real."""

from __future__ import annotations

import matplotlib.image
import pytest

from conftest import REPO
from launcher.recipe import load_recipe, parse_config
from launcher.tools.cli import main as launcher_main
from launcher.tools.plot_lr import plot, schedule_values

MNIST = REPO / "recipes" / "mnist.py"


def test_plot_lr_draws_the_runs_schedule(tmp_path, mnist_root, capsys):
    out = tmp_path / "lr.png"
    args = [
        "--data.root",
        str(mnist_root),
        "--max-epochs",
        "4",
        "--schedule.warmup",
        "exponential",
        "--schedule.warmup-epochs",
        "1",
        "--schedule.warmup-start-factor",
        "0.01",
    ]
    assert launcher_main(["plot-lr", str(MNIST), *args, "-o", str(out)]) == 0
    assert "500 steps, 125 per epoch" in capsys.readouterr().out
    image = matplotlib.image.imread(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.std() > 0

    cfg = parse_config(load_recipe(MNIST), args, prog="test")
    lrs, steps_per_epoch = schedule_values(cfg, 8000, processes=1)
    drawn = plot(lrs, steps_per_epoch, tmp_path / "again.png", "t")
    assert drawn["step"] == list(range(500)) and drawn["epoch_boundaries"] == [125, 250, 375]
    assert drawn["lr"][0] == pytest.approx(0.05 * 0.01)  # exponential warm-up from 1% of the peak
    assert drawn["lr"][125] == pytest.approx(0.05) and drawn["lr"][-1] < 1e-5  # peak, then cosine to ~0
    # Two processes halve the steps per epoch (global batch 128): the plot follows the run's real length.
    assert schedule_values(cfg, 8000, processes=2)[1] == 62


def test_plot_lr_bad_input(tmp_path, capsys):
    assert launcher_main(["plot-lr", "recipes/none.py", "-o", str(tmp_path / "x.png")]) == 2
    assert "not found" in capsys.readouterr().err
