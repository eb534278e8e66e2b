"""`launcher plot RUN [RUN ...] [-o curves.png]`: the training and validation curves of one or more runs.

One panel per quantity, against the optimizer step (bottom axis) and the epoch (top axis, when the runs agree
on the steps per epoch): the loss (train and validation), every other metric the records hold (accuracy; r2,
mae, rmse; perplexity, bits_per_char; ...; a training metric shares the panel of the validation metric of the
same name), and the training-only values (grad_norm, lr). Throughput and counts are left out.

Sources: metrics.jsonl for everything, and for the lr also the TensorBoard event files under RUN/tensorboard,
which hold the lr of every optimizer step (`--logging.lr-every-step`), where metrics.jsonl has only the logging
steps: a warm-up of fewer steps than the logging interval shows only there.

A resumed run logs again the steps between its checkpoint and the point where it stopped; the later record of a
step wins (in metrics.jsonl: the later line; in TensorBoard: the later event, by wall time), so every curve is
one line. Several runs share the panels, one colour per run; the legend names each run by the settings the runs
differ in, from their config.json (the columns `launcher sweep-summary` shows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from launcher.config import flatten
from launcher.errors import UserError
from launcher.files import read_jsonl
from launcher.tools.sweep import Run, _fmt, varied_keys

LABELS = {"train": "train", "eval": "validation"}
COLORS = {"train": "C0", "eval": "C1"}  # one run: the same colour for a kind in every panel
LINESTYLES = {"train": "--", "eval": "-"}  # several runs: the colour is the run's, the line style the kind's
# How fast and how big (launcher/progress.py): the hardware's story, not the learning curves.
PERFORMANCE = {
    "samples_per_s",
    "tokens_per_s",
    "tflops",
    "mfu",
    "mem_alloc_gb",
    "mem_reserved_gb",
    "rss_peak_gb",
}
# Bookkeeping, throughput and counts (skipped_steps: updates the fp16 grad scaler skipped, logged only when
# there were some, so a line through its points would mislead).
NOT_CURVES = {"kind", "step", "epoch", "samples", "skipped_steps",
              *PERFORMANCE}  # fmt: skip
MAX_LABEL_KEYS = 4  # a legend label of more settings than this would not fit beside the panels
LR_TAG = "train/lr"  # the TensorBoard tag of the lr (launcher/progress.py)


@dataclass
class Series:
    """One curve: a quantity of one record kind ("train" or "eval") of one run, against the optimizer step."""

    kind: str
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    run: str = ""
    """The run's legend label: the settings it differs in from the other runs, or its name when plotted alone."""

    @property
    def label(self) -> str:
        return LABELS[self.kind]


def run_file(path: Path) -> Path:
    """The metrics.jsonl of a run directory (or the file itself); a one-line error naming the fix otherwise."""
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    if file.is_file() and file.suffix == ".jsonl":
        return file
    if file.is_file():  # e.g. a curves.png that a shell pattern (runs/sweep-1/*) matched beside the runs
        raise UserError(
            f"{path} is not a run directory or a metrics.jsonl: pass run directories (a shell pattern ending "
            "in / matches only directories: runs/sweep-1/*/)"
        )
    if path.is_dir():
        raise UserError(
            f"{path} holds no metrics.jsonl: is it a run directory (<output-dir>/<run-name>)? A run writes "
            "metrics.jsonl when it starts"
        )
    raise UserError(
        f"no run directory or metrics file at {path}: pass a run directory (<output-dir>/<run-name>, the folder "
        "that holds metrics.jsonl) or a metrics.jsonl"
    )


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a run directory's (or a file's) metrics.jsonl; unreadable lines are skipped with a
    warning (a run killed while writing can leave half a line)."""
    file = run_file(path)
    records, bad = read_jsonl(file, keep=lambda r: isinstance(r, dict) and "kind" in r and "step" in r)
    if bad:
        print(f"warning: skipped unreadable line(s) {bad[:10]} of {file}", file=sys.stderr)
    return records


def collect(records: list[dict[str, Any]], run: str = "") -> dict[str, list[Series]]:
    """Panel name -> its curves (train before validation), each tagged with `run`. Panels: loss, then the
    validation metrics in the order they first appear, then training-only quantities; every numeric field is a
    quantity."""
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for record in records:
        if record["kind"] in LABELS:
            latest[record["kind"], int(record["step"])] = record
    panels: dict[str, dict[str, Series]] = {"loss": {}}
    # Validation records first, so that the panels of validation metrics come before lr and grad_norm.
    for (kind, step), record in sorted(latest.items(), key=lambda item: (item[0][0] != "eval", item[0][1])):
        for name, value in record.items():
            if name in NOT_CURVES or name.startswith("best_") or not _is_number(value):
                continue
            series = panels.setdefault(name, {}).setdefault(kind, Series(kind, run=run))
            series.steps.append(step)
            series.values.append(float(value))
    return {
        name: [curves[k] for k in ("train", "eval") if k in curves]
        for name, curves in panels.items()
        if curves
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def tensorboard_lr(run_dir: Path) -> dict[int, float]:
    """Step -> lr of every optimizer step in the run's TensorBoard event files ({} without any). A resumed run
    adds an event file and logs some steps again: the later event (by wall time) of a step wins."""
    tb_dir = Path(run_dir) / "tensorboard"
    if not any(tb_dir.glob("events.out.tfevents.*")):
        return {}
    # Imported here: it takes a quarter of a second, and runs without TensorBoard do not need it.
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    # size_guidance 0 keeps every scalar (the default samples 10,000 per tag). No purge of "orphaned" steps:
    # the last value per step is kept below, the same rule as for metrics.jsonl.
    events = EventAccumulator(str(tb_dir), size_guidance={SCALARS: 0}, purge_orphaned_data=False).Reload()
    if LR_TAG not in events.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in sorted(events.Scalars(LR_TAG), key=lambda e: e.wall_time)}


def add_lr(panels: dict[str, list[Series]], lrs: dict[int, float], run: str) -> None:
    """Fill the lr panel in with the lr of every step `lrs` holds (they win over metrics.jsonl's logging steps,
    which they repeat): one point per optimizer step."""
    if not lrs:
        return
    old = panels.pop("lr", [Series("train", run=run)])[0]
    merged = dict(zip(old.steps, old.values, strict=True)) | lrs
    steps = sorted(merged)
    panels["lr"] = [Series("train", steps, [merged[s] for s in steps], run=run)]


def steps_per_epoch(records: list[dict[str, Any]]) -> float | None:
    """From the latest setup record; else from the logged (step, epoch) pairs; None when there is no epoch."""
    setups = [r for r in records if r["kind"] == "setup" and r.get("steps_per_epoch")]
    if setups:
        return float(setups[-1]["steps_per_epoch"])
    ratios = [r["step"] / r["epoch"] for r in records if r["kind"] in LABELS and r.get("epoch")]
    return max(ratios) if ratios else None


def run_labels(dirs: Sequence[Path], names: Sequence[str]) -> list[str]:
    """Each run's legend label: the settings the runs differ in (`optim.lr=0.1, mixed_precision=bf16`), read
    from each config.json. Runs that those do not tell apart are named by their directory name (then path) as
    well; runs that differ in more than MAX_LABEL_KEYS settings (different recipes) by it alone."""
    runs = []
    for run_dir, name in zip(dirs, names, strict=True):
        config_file = run_dir / "config.json"
        config = flatten(json.loads(config_file.read_text())) if config_file.is_file() else {}
        runs.append(Run(name, config, metrics={}, step=0, state=""))
    keys = varied_keys(runs)
    if len(keys) > MAX_LABEL_KEYS:
        keys = []
    # A string setting may hold a newline (charlm's sample.prompt): the label stays one line.
    settings = [
        ", ".join(f"{k}={_fmt(run.config.get(k), setting=True)}".replace("\n", "\\n") for k in keys)
        for run in runs
    ]
    labels = settings
    if not all(labels) or len(set(labels)) < len(labels):
        for ids in (names, [str(d) for d in dirs]):
            labels = [f"{i} ({s})" if s else i for i, s in zip(ids, settings, strict=True)]
            if len(set(labels)) == len(labels):
                break
    return labels


def load(runs: Sequence[Path]) -> tuple[dict[str, list[Series]], float | None, str]:
    """The panels of all `runs` (run directories or metrics.jsonl files), the steps per epoch (None unless the
    runs agree on it) and the title: what `draw` takes."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise UserError("no run to plot: pass one or more run directories")
    files = [run_file(r) for r in runs]
    dirs = [f.parent for f in files]
    if len({f.resolve() for f in files}) < len(files):
        twice = next(r for i, r in enumerate(runs) if files[i].resolve() in {f.resolve() for f in files[:i]})
        raise UserError(f"the run {twice} is given twice: pass each run once")
    names = [d.resolve().name for d in dirs]
    labels = run_labels(dirs, names) if len(runs) > 1 else names
    per_run, per_epoch = [], set()
    for run, file, run_dir, label in zip(runs, files, dirs, labels, strict=True):
        records = read_records(file)
        panels = collect(records, label)
        if not panels:
            raise UserError(
                f"{run} has no train or eval records yet: a run logs them every --logging.every-steps steps "
                "and at each evaluation"
            )
        add_lr(panels, tensorboard_lr(run_dir), label)
        per_run.append(panels)
        per_epoch.add(steps_per_epoch(records))
    # Panels in the order of one run's: loss, then those with a validation curve, then training-only ones, lr
    # last.
    order: dict[str, bool] = {}
    for panels in per_run:
        for name, curves in panels.items():
            order[name] = order.get(name, False) or any(s.kind == "eval" for s in curves)
    names_in_order = sorted(order, key=lambda n: (n != "loss", not order[n], n == "lr"))
    merged = {n: [s for panels in per_run for s in panels.get(n, [])] for n in names_in_order}
    if len(runs) == 1:
        title = names[0]
    else:
        parents = {d.resolve().parent for d in dirs}
        title = f"{len(runs)} runs" + (f" in {parents.pop().name}" if len(parents) == 1 else "")
    return merged, per_epoch.pop() if len(per_epoch) == 1 else None, title


def run_colors(runs: Sequence[str]) -> dict[str, Any]:
    """One colour per run: the default cycle's ten, then evenly spread over viridis."""
    if len(runs) <= 10:
        return {run: f"C{i}" for i, run in enumerate(runs)}
    return {run: colormaps["viridis"](i / (len(runs) - 1)) for i, run in enumerate(runs)}


def draw(panels: dict[str, list[Series]], per_epoch: float | None, title: str) -> Figure:
    """One panel per quantity, stacked, sharing the step axis; the top panel also shows epochs. One run: a
    colour per kind (train, validation) and a legend in each panel. Several: a colour per run, dashed train and
    solid validation lines, and one legend beside the top panel."""
    runs = list(dict.fromkeys(s.run for curves in panels.values() for s in curves))
    several = len(runs) > 1
    colors = run_colors(runs)
    fig = Figure(figsize=(11 if several else 8, 1.2 + 2.4 * len(panels)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, curves) in zip(axes, panels.items(), strict=True):
        for series in curves:
            ax.plot(
                series.steps,
                series.values,
                label=f"{series.run} ({series.label})" if several else series.label,
                color=colors[series.run] if several else COLORS[series.kind],
                linestyle=LINESTYLES[series.kind] if several else "-",
                marker="o" if series.kind == "eval" else None,  # evaluations are few: show each one
                markersize=3,
            )
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if not several:
            ax.legend(loc="best", fontsize="small")
    if several:
        kinds = [k for k in LABELS if any(s.kind == k for curves in panels.values() for s in curves)]
        handles = [Line2D([], [], color=colors[run], label=run) for run in runs]
        handles += [
            Line2D([], [], color="grey", linestyle=LINESTYLES[k], marker="o" if k == "eval" else None,
                   markersize=3, label=LABELS[k])
            for k in kinds
        ]  # fmt: skip
        axes[0].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    axes[-1].set_xlabel("optimizer step")
    if per_epoch:
        top = axes[0].secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
        top.set_xlabel("epoch")
    # The title 0.1 inch from the top: at its default height (a share of the figure's), it would overlap the
    # top panel of a figure of many panels, where tight_layout leaves it a fixed space.
    fig.suptitle(title, y=1 - 0.1 / fig.get_figheight(), va="top")
    fig.tight_layout()  # it makes room for the title, the epoch axis and a legend beside the panels
    return fig


def plot(runs: Path | Sequence[Path], out: Path) -> dict[str, list[Series]]:
    """Draw the curves of `runs` (run directories or metrics.jsonl files; one path is one run) into `out`;
    returns what was drawn: panel -> its curves, each of one run (`Series.run`) and kind."""
    panels, per_epoch, title = load([runs] if isinstance(runs, (str, os.PathLike)) else runs)
    fig = draw(panels, per_epoch, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return panels


def summary(panels: dict[str, list[Series]]) -> str:
    """What was drawn, in a line: points per curve for one run; the runs and panels for several."""
    runs = list(dict.fromkeys(s.run for curves in panels.values() for s in curves))
    if len(runs) > 1:
        return f"{len(runs)} runs ({'; '.join(runs)}); panels {', '.join(panels)}"
    return "; ".join(
        f"{name} ({', '.join(f'{s.label} {len(s.steps)} points' for s in curves)})"
        for name, curves in panels.items()
    )


def default_output(runs: Sequence[Path]) -> Path:
    """RUN/curves.png for one run; curves.png in the runs' common folder (a sweep's folder) for several."""
    dirs = [r.parent if r.is_file() else r for r in runs]
    if len(dirs) == 1:
        return dirs[0] / "curves.png"
    return Path(os.path.commonpath([d.resolve().parent for d in dirs])) / "curves.png"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launcher plot",
        description="Draw the train/validation loss, metrics and lr of one or more runs against step and "
        "epoch, from their metrics.jsonl (and the lr of every step from TensorBoard), to a PNG. Several runs "
        "share the panels, one colour per run, labelled by the settings they differ in.",
        epilog="examples: launcher plot runs/mnist-20250101-120000 -o curves.png; "
        "launcher plot runs/sweep-123/*/ --out sweep.png",
    )
    parser.add_argument(
        "runs", metavar="RUN", type=Path, nargs="+", help="a run directory (or its metrics.jsonl)"
    )
    parser.add_argument(
        "-o",
        "--out",
        "--output",
        dest="output",
        metavar="PNG",
        type=Path,
        help="the file to write (default: RUN/curves.png; for several runs, curves.png in their common folder)",
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        out = args.output or default_output(args.runs)
        panels = plot(args.runs, out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {summary(panels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
