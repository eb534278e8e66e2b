"""`launcher plot`: the curves drawn are those of metrics.jsonl (read back from the figure), in a real PNG."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from conftest import TEST_RECIPES, metrics, train
from launcher.tools.plot_curves import collect, draw, main, read_records, steps_per_epoch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist_root):
    """A real run: 30 steps of 64 digits (125 make an epoch of 8,000), logged every 2, evaluated every 5."""
    out = tmp_path_factory.mktemp("runs")
    args = ("--data.root", mnist_root, "--output-dir", out, "--run-name", "r", "--max-steps", 30)
    args += ("--data.batch-size", 64, "--logging.every-steps", 2, "--eval-every-steps", 5)
    args += ("--optim.grad-clip-norm", 10.0, "--logging.no-progress-bar", "--logging.no-tensorboard")
    assert train(TEST_RECIPES / "mlp.py", *args) == 0
    return out / "r"


def lines_of(fig) -> dict[str, dict[str, tuple[list, list]]]:
    """Panel (y label) -> legend label -> (x, y) of each line, read back from the matplotlib figure."""
    return {
        ax.get_ylabel(): {
            line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()
        }
        for ax in fig.axes
        if ax.get_ylabel()
    }


def test_figure_holds_the_logged_curves(run_dir):
    records = read_records(run_dir)
    fig = draw(collect(records), steps_per_epoch(records), "r")
    drawn = lines_of(fig)
    assert list(drawn) == ["loss", "accuracy", "grad_norm", "lr"]
    assert {panel: sorted(curves) for panel, curves in drawn.items()} == {
        "loss": ["train", "validation"],
        "accuracy": ["validation"],
        "lr": ["train"],
        "grad_norm": ["train"],
    }
    train_records, eval_records = metrics(run_dir, "train"), metrics(run_dir, "eval")
    assert drawn["loss"]["train"] == ([r["step"] for r in train_records], [r["loss"] for r in train_records])
    assert drawn["loss"]["validation"] == ([5, 10, 15, 20, 25, 30], [r["loss"] for r in eval_records])
    assert drawn["accuracy"]["validation"][1] == [r["accuracy"] for r in eval_records]
    assert drawn["lr"]["train"][0] == list(range(2, 31, 2))
    # The first panel's top axis is the epoch: 125 optimizer steps per epoch in this run.
    fig.canvas.draw()  # a secondary axis takes its limits from its parent when drawn
    (top,) = fig.axes[0].child_axes
    assert top.get_xlabel() == "epoch"
    assert top.get_xlim() == pytest.approx([x / 125 for x in fig.axes[0].get_xlim()])


def test_cli_writes_a_real_png(run_dir, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main([str(run_dir), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(out)
    assert pixels.ndim == 3 and pixels.shape[0] > 400 and pixels.shape[1] == 800
    assert pixels.std() > 0.05  # not a blank canvas
    assert capsys.readouterr().out.startswith(
        f"wrote {out}: loss (train 15 points, validation 6 points); accuracy (validation 6 points)"
    )
    assert main([str(run_dir)]) == 0  # default output: inside the run directory
    assert (run_dir / "curves.png").read_bytes()[:8] == PNG_SIGNATURE


def test_resumed_steps_are_drawn_once_with_the_later_values():
    records = [
        {"kind": "setup", "step": 0, "epoch": 0, "steps_per_epoch": 4},
        {"kind": "train", "step": 2, "epoch": 0.5, "loss": 2.0, "lr": 0.1, "samples_per_s": 9.0},
        {"kind": "train", "step": 4, "epoch": 1.0, "loss": 1.5, "lr": 0.1, "samples_per_s": 9.0},
        {
            "kind": "eval",
            "step": 4,
            "epoch": 1.0,
            "loss": 1.4,
            "accuracy": 0.5,
            "samples": 10,
            "best_accuracy": 0.5,
        },
        # Killed after step 4, resumed from a checkpoint at step 2: step 4 is logged again.
        {"kind": "setup", "step": 2, "epoch": 0.5, "steps_per_epoch": 4, "resumed_from": "x"},
        {"kind": "train", "step": 4, "epoch": 1.0, "loss": 1.6, "lr": 0.1, "samples_per_s": 9.0},
        {
            "kind": "eval",
            "step": 4,
            "epoch": 1.0,
            "loss": 1.3,
            "accuracy": 0.6,
            "samples": 10,
            "best_accuracy": 0.6,
        },
        {
            "kind": "final",
            "step": 4,
            "epoch": 1.0,
            "loss": 1.3,
            "accuracy": 0.6,
            "best_step": 4,
            "flag": True,
        },
    ]
    panels = collect(records)
    assert list(panels) == ["loss", "accuracy", "lr"]  # no samples, samples_per_s, best_* or final records
    train_loss, eval_loss = panels["loss"]
    assert (train_loss.label, train_loss.steps, train_loss.values) == ("train", [2, 4], [2.0, 1.6])
    assert (eval_loss.label, eval_loss.steps, eval_loss.values) == ("validation", [4], [1.3])
    assert steps_per_epoch(records) == 4.0


def test_bad_input_is_named(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert f"error: no run directory or metrics file at {tmp_path / 'nope'}" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert f"error: {tmp_path} holds no metrics.jsonl: is it a run directory" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "setup", "step": 0, "epoch": 0}) + "\n")
    assert main([str(tmp_path)]) == 2
    assert "has no train or eval records yet" in capsys.readouterr().err
    # A run killed while writing leaves half a line: it is skipped with a warning, the rest is drawn.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "step": 1, "epoch": 0.1, "loss": 2.3}) + '\n{"kind": "tr')
    assert main([str(tmp_path / "metrics.jsonl"), "-o", str(tmp_path / "c.png")]) == 0
    captured = capsys.readouterr()
    assert "skipped unreadable line(s) [3]" in captured.err and "loss (train 1 points)" in captured.out
