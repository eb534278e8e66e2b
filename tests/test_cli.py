"""Command-line parsing and bad input: explicit argument lists, messages that name the problem and the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TEST_RECIPES
from launcher.cli import main as launcher_main
from launcher.errors import UserError
from launcher.recipe import load_recipe, parse_config
from launcher.train import main as train_main

MNIST_RECIPE = REPO / "recipes" / "mnist.py"


def parse(*args: str):
    return parse_config(load_recipe(MNIST_RECIPE), list(args), prog="test")


def test_recipe_values_are_the_defaults_and_flags_override_them():
    cfg = parse()
    assert (cfg.optim.lr, cfg.max_epochs, cfg.data.batch_size) == (0.05, 3, 64)
    cfg = parse(
        "--optim.lr",
        "0.01",
        "--max-epochs",
        "5",
        "--data.root",
        "/data",
        "--optim.name",
        "adamw",
        "--schedule.milestones-epochs",
        "2",
        "4",
        "--optim.no-nesterov",
        "--model.channels",
        "8",
    )
    assert (cfg.optim.lr, cfg.max_epochs, cfg.data.root, cfg.optim.name) == (0.01, 5, Path("/data"), "adamw")
    assert cfg.schedule.milestones_epochs == (2.0, 4.0)
    assert cfg.optim.nesterov is False and cfg.model.channels == 8


def test_unknown_flag_is_named(capsys):
    with pytest.raises(SystemExit) as exc:
        parse("--optim.lrr", "0.1")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--optim.lrr" in err and "--optim.lr" in err  # the typo, and the suggestion


def test_wrong_type_names_flag_and_expected_type(capsys):
    with pytest.raises(SystemExit) as exc:
        parse("--max-epochs", "three")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--max-epochs" in err and "INT" in err


def test_wrong_choice_lists_choices(capsys):
    with pytest.raises(SystemExit):
        parse("--optim.name", "lion")
    err = capsys.readouterr().err
    assert "--optim.name" in err and "adamw" in err


def test_range_errors_name_the_flag():
    with pytest.raises(UserError, match=r"--data.batch-size must be at least 1 \(got 0\)"):
        parse("--data.batch-size", "0")
    with pytest.raises(UserError, match="--phase test needs --weights"):
        parse("--phase", "test")


def test_missing_recipe_lists_the_recipes(capsys):
    assert train_main(["recipes/nope.py"]) == 2
    err = capsys.readouterr().err
    assert "recipe 'recipes/nope.py' not found" in err and "recipes/mnist.py" in err
    assert "Traceback" not in err


def test_recipe_that_raises_shows_its_own_traceback(capsys):
    assert train_main([str(TEST_RECIPES / "broken.py")]) == 2
    err = capsys.readouterr().err
    assert "broken.py" in err and "line 5, in helper" in err and "KeyError: 'missing-key'" in err
    assert "importlib" not in err  # the loader's frames are not the user's business


def test_help_lists_every_field_with_docstring_and_default():
    out = subprocess.run(
        [sys.executable, "-m", "launcher.train", "recipes/mnist.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0
    text = out.stdout
    for flag, doc in [
        ("--optim.lr", "Peak learning rate"),
        ("--data.root", "Dataset root"),
        ("--model.channels", "Channels of the first"),
        ("--output-dir", "run directories"),
        ("--schedule.warmup", "Warm-up shape"),
        ("--resume", "newest valid checkpoint"),
    ]:
        assert flag in text and doc in text, flag
    assert "(default: 0.05)" in text  # the recipe's value, not the library's


def test_config_json_feeds_back(tmp_path):
    cfg = parse("--optim.lr", "0.02", "--schedule.milestones-epochs", "1", "2")
    from launcher.config import save_json

    save_json(cfg, tmp_path / "config.json")
    again = parse("--config", str(tmp_path / "config.json"), "--max-epochs", "7")
    assert again.optim.lr == 0.02 and again.schedule.milestones_epochs == (1.0, 2.0) and again.max_epochs == 7
    data = json.loads((tmp_path / "config.json").read_text())
    data["optim"]["lrate"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"unknown entries \['lrate'\]"):
        parse("--config", str(tmp_path / "bad.json"))


def test_missing_data_says_where_it_looked_and_how_to_fix(tmp_path, capsys):
    code = train_main(
        [
            "recipes/mnist.py",
            "--data.root",
            str(tmp_path / "nowhere"),
            "--data.no-download",
            "--output-dir",
            str(tmp_path / "runs"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in err and "--data.root" in err
    assert "Traceback" not in err


def test_launcher_help_and_unknown_command(capsys):
    assert launcher_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "plot-lr" in out and "train" in out
    assert launcher_main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run(["launcher", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: launcher COMMAND" in out.stdout
