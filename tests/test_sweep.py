"""`launcher sweep-summary`: the table of a folder of runs, from metrics.jsonl and config.json files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.tools.cli import main as cli


def _run(folder: Path, name: str, lr: float, records: list[dict], **config) -> None:
    run = folder / name
    run.mkdir(parents=True)
    cfg = {"run_name": name, "output_dir": str(folder), "key_metric": "accuracy", "key_metric_mode": "max"}
    cfg |= {"optim": {"lr": lr, "betas": [0.9, 0.999]}, "seed": 0, **config}
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _final(step: int, accuracy: float, best: float, best_step: int) -> dict:
    return {"kind": "final", "step": step, "epoch": 1.0, "loss": 1 - accuracy, "accuracy": accuracy} | {
        "samples": 2000,
        "best_accuracy": best,
        "best_step": best_step,
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    _run(tmp_path, "mnist-9_0", 0.01, [{"kind": "setup", "step": 0}, _final(60, 0.90, 0.91, 40)])
    _run(tmp_path, "mnist-9_1", 0.1, [_final(60, 0.97, 0.97, 60)])
    _run(tmp_path, "mnist-9_2", 1.0, [_final(60, 0.10, 0.12, 20)])
    # Preempted or still running: no final line; its last evaluation stands in, its line cut short by a kill.
    unfinished = [
        {"kind": "eval", "step": 20, "epoch": 0.3, "loss": 0.5, "accuracy": 0.8, "best_accuracy": 0.8}
    ]
    _run(tmp_path, "mnist-9_3", 0.03, unfinished)
    with open(tmp_path / "mnist-9_3" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 2')
    (tmp_path / "notes").mkdir()  # not a run
    return tmp_path


def test_rows_are_sorted_best_first_with_the_varied_settings(sweep: Path, capsys) -> None:
    assert cli(["sweep-summary", str(sweep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header == ["run", "optim.lr", "step", "loss", "accuracy", "best_accuracy", "best_step", "state"]
    rows = [line.split() for line in lines[2:6]]
    assert [row[0] for row in rows] == ["mnist-9_1", "mnist-9_0", "mnist-9_3", "mnist-9_2"]
    assert rows[0] == ["mnist-9_1", "0.1", "60", "0.0300", "0.9700", "0.9700", "60", "done"]
    assert rows[2] == ["mnist-9_3", "0.03", "20", "0.5000", "0.8000", "0.8000", "20", "unfinished"]
    assert lines[-1] == "4 run(s), sorted by best_accuracy, largest first"
    # Columns line up: every row is as wide as the rule under the header, less trailing blanks.
    assert all(len(line) <= len(lines[1]) for line in lines[:6])


def test_sort_by_another_column(sweep: Path, capsys) -> None:
    assert cli(["sweep-summary", str(sweep), "--sort", "optim.lr"]) == 0
    rows = [line.split()[1] for line in capsys.readouterr().out.splitlines()[2:6]]
    assert rows == ["0.01", "0.03", "0.1", "1"]


def test_loss_as_key_metric_sorts_smallest_first(tmp_path: Path, capsys) -> None:
    for name, best in (("a", 0.3), ("b", 0.1)):
        final = {"kind": "final", "step": 5, "loss": best, "best_loss": best, "best_step": 5}
        _run(tmp_path, name, 0.1, [final], key_metric="loss", key_metric_mode="min")
    assert cli(["sweep-summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[2:4]] == ["b", "a"]
    assert "sorted by best_loss, smallest first" in out


def test_bad_inputs_name_the_problem(tmp_path: Path, sweep: Path, capsys) -> None:
    assert cli(["sweep-summary", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli(["sweep-summary", str(tmp_path / "empty")]) == 2
    assert "no runs in" in capsys.readouterr().err
    assert cli(["sweep-summary", str(sweep), "--sort", "lr"]) == 2
    assert "--sort lr: no such column; the columns are run, optim.lr" in capsys.readouterr().err
