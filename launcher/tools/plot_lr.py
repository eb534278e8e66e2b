"""`launcher plot-lr RECIPE [overrides] -o lr.png`: the learning rate the recipe would use at every step."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from launcher.config import TrainConfig
from launcher.data import TrainPlan
from launcher.errors import UserError
from launcher.recipe import load_recipe, parse_config
from launcher.schedules import lr_multiplier, run_length, schedule_steps

USAGE = """usage: launcher plot-lr RECIPE [--field.name VALUE ...] [-o lr.png] [--processes N]

Draws lr against optimizer step, with epoch boundaries, for the schedule RECIPE would run with the given
overrides. The number of steps per epoch depends on the training set size and the global batch, so the
recipe's datasets are built (pass --data.root as for training). --processes N (default 1) sets the number of
processes the run would use.

example: launcher plot-lr recipes/mnist.py --data.root ../shared/data/mnist-mini --max-epochs 10 -o lr.png
"""


def _pop(argv: list[str], flag: str, default: str) -> str:
    if flag in argv:
        i = argv.index(flag)
        if i + 1 >= len(argv):
            raise UserError(f"{flag} needs a value")
        value = argv[i + 1]
        del argv[i : i + 2]
        return value
    return default


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        out = Path(_pop(argv, "-o", _pop(argv, "--output", "lr.png")))
        processes = int(_pop(argv, "--processes", "1"))
        recipe = load_recipe(argv[0])
        cfg = parse_config(recipe, argv[1:], prog=f"launcher plot-lr {argv[0]}")
        lrs, steps_per_epoch = schedule_values(cfg, len(recipe.make_datasets(cfg).train), processes)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    title = f"{recipe.name}: warm-up {cfg.schedule.warmup}, decay {cfg.schedule.decay}"
    if cfg.schedule.decay == "plateau":
        title += " (reductions depend on evaluations: not drawn)"
    plot(lrs, steps_per_epoch, out, title)
    print(f"wrote {out}: {len(lrs)} steps, {steps_per_epoch} per epoch, lr {min(lrs):.3g} .. {max(lrs):.3g}")
    return 0


def schedule_values(cfg: TrainConfig, train_samples: int, processes: int) -> tuple[list[float], int]:
    """The lr of every optimizer step of the run `cfg` describes, and the optimizer steps per epoch."""
    plan = TrainPlan(train_samples, cfg.data.batch_size, processes, 0, cfg.data.drop_last)
    steps_per_epoch, total = run_length(
        plan.batches_per_epoch, cfg.grad_accum_steps, cfg.max_epochs, cfg.max_steps
    )
    steps = schedule_steps(cfg.schedule, steps_per_epoch, total)
    return [cfg.optim.lr * lr_multiplier(s, steps, cfg.schedule) for s in range(total)], steps_per_epoch


def plot(lrs: list[float], steps_per_epoch: int, out: Path, title: str) -> dict[str, list[float]]:
    """Draw to `out`; returns what was drawn (the lr line's points and the epoch boundaries), read back from the
    figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(range(len(lrs)), lrs, label="lr")
    for epoch_step in range(steps_per_epoch, len(lrs), steps_per_epoch):
        ax.axvline(epoch_step, color="grey", alpha=0.3, linewidth=0.8)
    ax.set_xlabel(f"optimizer step (grey lines: epoch boundaries, {steps_per_epoch} steps each)")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    line, *boundaries = ax.get_lines()
    drawn = {
        "step": [float(x) for x in line.get_xdata()],
        "lr": [float(y) for y in line.get_ydata()],
        "epoch_boundaries": [float(b.get_xdata()[0]) for b in boundaries],
    }
    plt.close(fig)
    return drawn
