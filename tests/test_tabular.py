"""recipes/tabular.py on the real diabetes table: regression against ordinary least squares on the same split,
classification from the same recipe, predictions from the saved weights alone, and one-line errors for bad CSVs."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, metrics, train
from launcher.recipe import load_recipe

RECIPE = REPO / "recipes" / "tabular.py"
DIABETES = REPO.parent / "shared" / "data" / "diabetes" / "diabetes.csv"


def _module():
    load_recipe(RECIPE)
    return sys.modules["launcher_recipe_tabular"]


def _args(out: Path, name: str, *extra: str | Path) -> list[str | Path]:
    return [RECIPE, "--data.path", DIABETES, "--output-dir", out, "--run-name", name, "--logging.no-progress-bar",
            "--checkpoint.every-epochs", "0", *extra]  # fmt: skip


def _ols_r2() -> float:
    """Ordinary least squares (with an intercept) fitted on the recipe's training rows, R² on its held-out rows."""
    module = _module()
    table = module.read_table(DIABETES, "progression")
    train_rows, held_out = module.split(DIABETES, "progression", 0.2, 0)
    x = torch.cat([table.x, torch.ones(len(table.x), 1, dtype=torch.float64)], dim=1)
    w = torch.linalg.lstsq(x[train_rows], table.y[train_rows]).solution
    y = table.y[held_out]
    return 1 - ((x[held_out] @ w - y) ** 2).sum().item() / ((y - y.mean()) ** 2).sum().item()


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_regression_reaches_least_squares_and_its_weights_alone_predict(tmp_path):
    """Early-stopped on the validation loss, the MLP's best validation R² is within 0.03 of OLS on the same split
    (or above it), reported with MSE and MAE; best.safetensors carries the training rows' statistics, so that
    --phase predict on the raw CSV reproduces the best evaluation's R² on the held-out rows."""
    assert train(*_args(tmp_path, "reg")) == 0
    evals = metrics(tmp_path / "reg", "eval")
    best = min(evals, key=lambda r: r["loss"])
    ols = _ols_r2()
    assert best["r2"] >= ols - 0.03, (best, ols)
    assert best["mse"] == best["loss"] and 0 < best["mae"] < math.sqrt(best["mse"])
    assert metrics(tmp_path / "reg", "early_stop"), (
        "early stopping on the validation loss did not stop the run"
    )

    no_target = tmp_path / "new.csv"  # the features only, as new patients would come
    rows = DIABETES.read_text().splitlines()
    no_target.write_text("\n".join(",".join(line.split(",")[:-1]) for line in rows) + "\n")
    weights = tmp_path / "reg" / "best.safetensors"
    args = [RECIPE, "--phase", "predict", "--weights", weights, "--data.path", no_target, "--output-dir", tmp_path,
            "--run-name", "pred", "--logging.no-progress-bar"]  # fmt: skip
    assert train(*args) == 0
    predicted = _read_csv(tmp_path / "pred" / "predictions.csv")
    assert len(predicted) == 442 and [int(r["row"]) for r in predicted[:2]] == [2, 3]
    module = _module()
    held_out = module.split(DIABETES, "progression", 0.2, 0)[1]
    y = module.read_table(DIABETES, "progression").y[held_out]
    p = torch.tensor([float(predicted[i]["progression"]) for i in held_out.tolist()], dtype=torch.float64)
    r2 = 1 - ((p - y) ** 2).sum().item() / ((y - y.mean()) ** 2).sum().item()
    assert r2 == pytest.approx(best["r2"], abs=1e-4)


def test_classification_from_the_same_recipe_with_class_probabilities(tmp_path):
    args = _args(tmp_path, "cls", "--data.task", "classification", "--data.target", "sex", "--key-metric",
                 "accuracy", "--key-metric-mode", "max", "--max-epochs", "5")  # fmt: skip
    assert train(*args) == 0
    final = metrics(tmp_path / "cls", "final")[-1]
    assert 0.5 < final["accuracy"] <= 1 and final["samples"] == 88
    args = [RECIPE, "--phase", "predict", "--weights", tmp_path / "cls" / "best.safetensors", "--data.path", DIABETES,
            "--data.task", "classification", "--data.target", "sex", "--output-dir", tmp_path, "--run-name", "p",
            "--logging.no-progress-bar"]  # fmt: skip
    assert train(*args) == 0
    predicted = _read_csv(tmp_path / "p" / "predictions.csv")
    assert list(predicted[0]) == ["row", "sex", "p_1", "p_2"]
    for row in predicted:
        assert row["sex"] in ("1", "2") and float(row["p_1"]) + float(row["p_2"]) == pytest.approx(
            1, abs=1e-5
        )


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("a,b,progression\n1,2,3\n", ["--data.target", "y"], "no column 'y' (columns: a, b, progression)"),
        ("a,b,progression\n1,2,3\n4,x,6\n", [], "row 3, column 'b': 'x' is not a number"),
        ("", [], "empty; expected a header row and at least one row of numbers"),
        ("a,b,progression\n1,2,3\n4,5,nan\n", [], "row 3, column 'progression': the target is NaN"),
        ("a,b,progression\n1,2,3\n4,5\n", [], "row 3: 2 cells, but the header has 3"),
    ],
)
def test_a_bad_csv_is_a_one_line_error_naming_the_row_and_column(tmp_path, capsys, content, extra, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    args = [
        RECIPE,
        "--data.path",
        path,
        "--output-dir",
        tmp_path,
        "--run-name",
        "r",
        "--logging.no-progress-bar",
    ]
    assert train(*args, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()
