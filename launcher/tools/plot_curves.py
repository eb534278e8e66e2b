"""`launcher plot RUN_DIR [-o curves.png]`: a run's training and validation curves, from its metrics.jsonl.

One panel per quantity, against the optimizer step (bottom axis) and the epoch (top axis): the loss (train and
validation), every other validation metric (accuracy, ...), and the training-only values (lr, grad_norm).
Throughput and counts are left out. A resumed run logs again the steps between its checkpoint and the point
where it stopped; the later record of a step wins, so every curve is one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from launcher.errors import UserError
from launcher.files import read_jsonl

LABELS = {"train": "train", "eval": "validation"}
COLORS = {"train": "C0", "eval": "C1"}  # the same colour for a kind in every panel
NOT_CURVES = {"kind", "step", "epoch", "samples", "samples_per_s"}  # bookkeeping and throughput


@dataclass
class Series:
    """One curve: a quantity of one record kind ("train" or "eval") against the optimizer step."""

    kind: str
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS[self.kind]


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a run directory's (or a file's) metrics.jsonl; unreadable lines are skipped with a
    warning (a run killed while writing can leave half a line)."""
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        if path.is_dir():
            raise UserError(
                f"{path} holds no metrics.jsonl: is it a run directory (<output-dir>/<run-name>)?"
            )
        raise UserError(f"no run directory or metrics file at {path}")
    records, bad = read_jsonl(file, keep=lambda r: isinstance(r, dict) and "kind" in r and "step" in r)
    if bad:
        print(f"warning: skipped unreadable line(s) {bad[:10]} of {file}", file=sys.stderr)
    return records


def collect(records: list[dict[str, Any]]) -> dict[str, list[Series]]:
    """Panel name -> its curves (train before validation). Panels: loss, then the validation metrics in the
    order they first appear, then training-only quantities; every numeric field is a quantity."""
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
            series = panels.setdefault(name, {}).setdefault(kind, Series(kind))
            series.steps.append(step)
            series.values.append(float(value))
    return {
        name: [curves[k] for k in ("train", "eval") if k in curves]
        for name, curves in panels.items()
        if curves
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def steps_per_epoch(records: list[dict[str, Any]]) -> float | None:
    """From the latest setup record; else from the logged (step, epoch) pairs; None when there is no epoch."""
    setups = [r for r in records if r["kind"] == "setup" and r.get("steps_per_epoch")]
    if setups:
        return float(setups[-1]["steps_per_epoch"])
    ratios = [r["step"] / r["epoch"] for r in records if r["kind"] in LABELS and r.get("epoch")]
    return max(ratios) if ratios else None


def draw(panels: dict[str, list[Series]], per_epoch: float | None, title: str) -> Figure:
    """One panel per quantity, stacked, sharing the step axis; the top panel also shows epochs."""
    fig = Figure(figsize=(8, 1.2 + 2.4 * len(panels)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, curves) in zip(axes, panels.items(), strict=True):
        for series in curves:
            marker = "o" if series.kind == "eval" else None  # evaluations are few: show each one
            ax.plot(
                series.steps,
                series.values,
                label=series.label,
                color=COLORS[series.kind],
                marker=marker,
                markersize=3,
            )
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("optimizer step")
    if per_epoch:
        top = axes[0].secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
        top.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot(run: Path, out: Path) -> dict[str, list[Series]]:
    """Draw the curves of `run` (a run directory or a metrics.jsonl) into `out`; returns what was drawn."""
    records = read_records(run)
    panels = collect(records)
    if not panels:
        raise UserError(
            f"{run} has no train or eval records yet: a run logs them every --logging.every-steps steps "
            "and at each evaluation"
        )
    name = run.parent.name if run.is_file() else run.resolve().name
    fig = draw(panels, steps_per_epoch(records), title=name)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return panels


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launcher plot",
        description="Draw a run's train/validation loss and metrics against step and epoch, from its "
        "metrics.jsonl, to a PNG.",
        epilog="example: launcher plot runs/mnist-20250101-120000 -o curves.png",
    )
    parser.add_argument("run", metavar="RUN", type=Path, help="a run directory (or its metrics.jsonl)")
    parser.add_argument(
        "-o", "--output", metavar="PNG", type=Path, help="the file to write (default: RUN/curves.png)"
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    out = args.output or (args.run.parent if args.run.is_file() else args.run) / "curves.png"
    try:
        panels = plot(args.run, out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = "; ".join(
        f"{name} ({', '.join(f'{s.label} {len(s.steps)} points' for s in curves)})"
        for name, curves in panels.items()
    )
    print(f"wrote {out}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
