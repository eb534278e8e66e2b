"""`launcher plot`: the curves drawn are those of metrics.jsonl (read back from the figure), in a real PNG."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import matplotlib.image
import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from conftest import REPO, TEST_RECIPES, metrics, run_args, train
from launcher.recipe import load_recipe, parse_config
from launcher.tools.cli import main as launcher_main
from launcher.tools.plot_curves import (
    collect,
    draw,
    load,
    main,
    plot,
    read_records,
    steps_per_epoch,
    tensorboard_lr,
)
from launcher.tools.plot_lr import schedule_values

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist_root):
    """A real run: 30 steps of 64 digits (125 make an epoch of 8,000), logged every 2, evaluated every 5."""
    out = tmp_path_factory.mktemp("runs")
    args = ("--data.root", mnist_root, "--output-dir", out, "--run-name", "r", "--max-steps", 30)
    args += ("--data.batch-size", 64, "--logging.every-steps", 2, "--eval-every-steps", 5)
    args += ("--optim.grad-clip-norm", 10.0, "--logging.no-progress-bar", "--logging.trackers")
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


# Several runs, every step's lr, any task's metrics. Every run below is real: a few seconds of training on CPU.

MLP = TEST_RECIPES / "mlp.py"
TABULAR = REPO / "recipes" / "tabular.py"
CHARLM = REPO / "recipes" / "charlm.py"
DIABETES = REPO.parent / "shared" / "data" / "diabetes" / "diabetes.csv"
TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
# 20 steps of 64 digits, logged every 5 (so metrics.jsonl holds the lr of 4 steps), evaluated every 10; a linear
# warm-up over the first 10 steps, then cosine; TensorBoard on, with the lr of every step (the default).
LR_RUN = ["--max-steps", "20", "--data.batch-size", "64", "--logging.every-steps", "5", "--eval-every-steps", "10",
          "--schedule.warmup", "linear", "--schedule.warmup-steps", "10", "--checkpoint.every-steps", "10",
          "--checkpoint.keep-last", "5"]  # fmt: skip


def schedule(mnist_root, *overrides: str) -> list[float]:
    """The lr of every update of the mlp recipe with LR_RUN and `overrides`, from the schedule's pure function
    (what `launcher plot-lr` draws): index N - 1 is the lr the trainer logs at step N."""
    cfg = parse_config(load_recipe(MLP), ["--data.root", str(mnist_root), *LR_RUN, *overrides], prog="test")
    return schedule_values(cfg, 8000, processes=1)[0]


def tensorboard_scalars(run: Path, tag: str = "train/lr") -> list[tuple[int, float]]:
    """(step, value) of every event of `tag` in the run's event files, read back with tensorboard's reader."""
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0}, purge_orphaned_data=False)
    return [(e.step, e.value) for e in events.Reload().Scalars(tag)]


@pytest.fixture(scope="module")
def lr_runs(tmp_path_factory, mnist_root) -> list[Path]:
    """Two real runs that differ only in --optim.lr, in one folder (as a sweep's runs are)."""
    out = tmp_path_factory.mktemp("sweep")
    for name, lr in (("a", "0.05"), ("b", "0.1")):
        assert train(*run_args(MLP, out, name, mnist_root, *LR_RUN, "--optim.lr", lr)) == 0
    return [out / "a", out / "b"]


def test_several_runs_share_the_panels_one_colour_each(lr_runs, tmp_path):
    out = tmp_path / "sweep.png"
    panels = plot(lr_runs, out)
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert list(panels) == ["loss", "accuracy", "grad_norm", "lr"]
    labels = ["optim.lr=0.05", "optim.lr=0.1"]  # the one setting the runs differ in, from their config.json
    for name, curves in panels.items():
        assert sorted({s.run for s in curves}) == labels, name
    for run, label in zip(lr_runs, labels, strict=True):
        curves = {(s.run, s.kind): s for s in panels["loss"]}
        train_records, eval_records = metrics(run, "train"), metrics(run, "eval")
        assert curves[label, "train"].steps == [5, 10, 15, 20]
        assert curves[label, "train"].values == [r["loss"] for r in train_records]
        assert curves[label, "eval"].steps == [10, 20]
        assert curves[label, "eval"].values == [r["loss"] for r in eval_records]
        (accuracy,) = [s for s in panels["accuracy"] if s.run == label]
        assert accuracy.values == [r["accuracy"] for r in eval_records]

    # The figure: each run one colour in every panel, the two runs two colours; train dashed, validation solid;
    # one legend that names the runs by their settings and the line styles by kind.
    fig = draw(*load(lr_runs))
    colors: dict[str, set] = {label: set() for label in labels}
    for ax in fig.axes[:3]:
        for line in ax.get_lines():
            run, kind = line.get_label().rsplit(" (", 1)
            colors[run].add(line.get_color())
            assert line.get_linestyle() == {"train)": "--", "validation)": "-"}[kind]
    assert all(len(c) == 1 for c in colors.values()) and len(set.union(*colors.values())) == 2
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == [*labels, "train", "validation"]
    assert fig.get_suptitle() == f"2 runs in {lr_runs[0].parent.name}"


def test_the_lr_panel_holds_every_optimizer_step_from_tensorboard(lr_runs, mnist_root):
    panels = plot(lr_runs, lr_runs[0].parent / "sweep.png")
    for run, peak, lr in zip(lr_runs, (0.05, 0.1), panels["lr"], strict=True):
        assert [r["step"] for r in metrics(run, "train") if "lr" in r] == [5, 10, 15, 20]  # all jsonl has
        assert lr.kind == "train" and lr.steps == list(range(1, 21))  # one point per optimizer step
        assert list(zip(lr.steps, lr.values, strict=True)) == tensorboard_scalars(run)
        assert lr.values == pytest.approx(schedule(mnist_root, "--optim.lr", str(peak)), rel=1e-6)
        # The warm-up: from 10% of the peak (the recipe's warmup_start_factor) up over the first 10 steps.
        assert lr.values[0] == pytest.approx(0.1 * peak, rel=1e-6) and lr.values[10] == pytest.approx(peak)
        assert all(a < b for a, b in itertools.pairwise(lr.values[:11]))


def test_a_resumed_run_draws_the_later_value_of_each_repeated_step(tmp_path, mnist_root):
    """Resumed from step 10 with a longer run, the same run directory's second event file repeats steps 11-20
    with other lrs (the cosine now ends at step 30): the resumed values are drawn, once."""
    assert train(*run_args(MLP, tmp_path, "r", mnist_root, *LR_RUN)) == 0
    step10 = tmp_path / "r" / "checkpoints" / "step-00000010"
    assert (
        train(*run_args(MLP, tmp_path, "r", mnist_root, *LR_RUN, "--max-steps", "30", "--resume", step10))
        == 0
    )
    assert len(list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert [step for step, _ in tensorboard_scalars(tmp_path / "r")].count(15) == 2
    (lr,) = plot(tmp_path / "r", tmp_path / "c.png")["lr"]
    assert lr.steps == list(range(1, 31))
    assert lr.values == pytest.approx(schedule(mnist_root, "--max-steps", "30"), rel=1e-6)
    assert lr.values[10:20] != pytest.approx(schedule(mnist_root)[10:20], rel=1e-6)  # not the first run's


def test_the_later_event_of_a_step_wins_by_wall_time(tmp_path):
    """Event files written in the other order than their names sort: the wall time decides, not the name."""
    from torch.utils.tensorboard import SummaryWriter

    resumed, first = SummaryWriter(tmp_path / "tensorboard"), SummaryWriter(tmp_path / "tensorboard")
    for step in range(1, 11):
        first.add_scalar("train/lr", step, step, walltime=1000.0 + step)
    for step in range(6, 13):
        resumed.add_scalar("train/lr", 100 + step, step, walltime=2000.0 + step)
    first.close()
    resumed.close()
    assert tensorboard_lr(tmp_path) == {s: float(s if s < 6 else 100 + s) for s in range(1, 13)}
    assert tensorboard_lr(tmp_path / "elsewhere") == {}  # no event files: metrics.jsonl's lr is drawn


def test_without_tensorboard_the_lr_comes_from_metrics_jsonl(run_dir, tmp_path):
    (lr,) = plot(run_dir, tmp_path / "c.png")["lr"]  # this run had no tracker: no event files
    assert (lr.steps, lr.values) == ([2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30],
                                      [r["lr"] for r in metrics(run_dir, "train")])  # fmt: skip


def test_a_regression_run_gets_its_own_metrics(tmp_path):
    args = ["--data.path", DIABETES, "--max-epochs", "2", "--output-dir", tmp_path, "--run-name", "tab"]
    assert train(TABULAR, *args, "--logging.no-progress-bar") == 0
    panels = plot(tmp_path / "tab", tmp_path / "c.png")
    assert list(panels) == [
        "loss",
        "mse",
        "rmse",
        "mae",
        "r2",
        "grad_norm",
        "lr",
    ]  # no accuracy: the records have none
    evals = metrics(tmp_path / "tab", "eval")
    (r2,) = panels["r2"]
    assert (r2.kind, r2.steps, r2.values) == ("eval", [12, 24], [r["r2"] for r in evals])
    assert [s.kind for s in panels["loss"]] == ["train", "eval"]
    assert panels["lr"][0].steps == list(range(1, 25))  # 12 steps an epoch, logged once an epoch


def test_a_language_model_run_gets_perplexity_and_bits_per_char(tmp_path):
    args = ["--data.path", TEXT, "--max-steps", "10", "--eval-every-steps", "5", "--data.val-fraction", "0.002",
            "--model.layers", "1", "--model.width", "32", "--model.heads", "2", "--data.block-size", "16",
            "--logging.every-steps", "5", "--sample.characters", "0", "--checkpoint.every-steps", "0"]  # fmt: skip
    assert (
        train(CHARLM, *args, "--output-dir", tmp_path, "--run-name", "lm", "--logging.no-progress-bar") == 0
    )
    panels = plot(tmp_path / "lm", tmp_path / "c.png")
    assert list(panels) == ["loss", "bits_per_char", "perplexity", "grad_norm", "lr"]
    evals = metrics(tmp_path / "lm", "eval")
    assert panels["perplexity"][0].values == [r["perplexity"] for r in evals]
    assert panels["bits_per_char"][0].values == [r["bits_per_char"] for r in evals]


def test_cli_with_several_runs(lr_runs, tmp_path, capsys):
    out = tmp_path / "two.png"
    assert main([*map(str, lr_runs), "--out", str(out)]) == 0
    assert (
        capsys.readouterr().out
        == f"wrote {out}: 2 runs (optim.lr=0.05; optim.lr=0.1); panels loss, accuracy, grad_norm, lr\n"
    )
    assert matplotlib.image.imread(out).shape[1] == 1100
    assert main([*map(str, lr_runs)]) == 0  # default output: beside the runs, in their folder
    assert (lr_runs[0].parent / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    # One run plotted alone: titled by its name, one legend per panel naming the kinds, as before.
    fig = draw(*load(lr_runs[:1]))
    assert fig.get_suptitle() == "a"
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["train", "validation"]


def test_a_missing_run_is_a_one_line_error_naming_it(lr_runs, tmp_path, capsys):
    missing = tmp_path / "sweep" / "c"
    assert launcher_main(["plot", str(lr_runs[0]), str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: no run directory or metrics file at {missing}: pass a run directory (<output-dir>/<run-name>, "
        "the folder that holds metrics.jsonl) or a metrics.jsonl\n"
    )
    assert main([str(lr_runs[0]), str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {tmp_path} holds no metrics.jsonl: is it a run directory"
    )
    # A shell pattern that matched the plot of an earlier call beside the runs: named, with the pattern to use.
    assert main([str(lr_runs[0]), str(lr_runs[0] / "config.json")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {lr_runs[0] / 'config.json'} is not a run directory")
    assert main([str(lr_runs[0]), str(lr_runs[0] / "metrics.jsonl"), "-o", str(tmp_path / "x.png")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: the run {lr_runs[0] / 'metrics.jsonl'} is given twice: pass each run once\n"
    )
