"""Command-line parsing and bad input: explicit argument lists, messages that name the problem and the fix."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TEST_RECIPES
from launcher.errors import UserError
from launcher.recipe import load_recipe, parse_config
from launcher.tools.cli import main as launcher_main
from launcher.tools.convert_ckpt import check_recipe
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
    assert "--config FILE" in text and "--print-config" in text


def test_print_config_writes_yaml_that_feeds_back_and_flags_after_it_override_it(tmp_path, capsys):
    from launcher.config import to_dict

    assert (
        train_main([str(MNIST_RECIPE), "--print-config", "--optim.lr", "0.02", "--model.channels", "12"]) == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("# recipes/mnist.py: the resolved config") or text.startswith("# ")
    (tmp_path / "mnist.yaml").write_text(text)
    again = parse("--config", str(tmp_path / "mnist.yaml"))
    assert to_dict(again) == to_dict(
        parse("--optim.lr", "0.02", "--model.channels", "12")
    )  # the recipe's own
    assert parse("--config", str(tmp_path / "mnist.yaml"), "--optim.lr", "0.3").optim.lr == 0.3  # section too
    # YAML as people write it: a partial file; PyYAML reads `3e-3` (no dot) as a string, which is taken as 0.003.
    (tmp_path / "short.yml").write_text("max_epochs: 2\noptim:\n  lr: 3e-3\n  betas: [0.8, 0.9]\n")
    short = parse("--config", str(tmp_path / "short.yml"))
    assert (short.max_epochs, short.optim.lr, short.optim.betas, short.optim.momentum) == (
        2,
        0.003,
        (0.8, 0.9),
        0.9,
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "optim:\n  momentom: 0.8\n",
            r"short.yaml.optim: unknown entries \['momentom'\] \(did you mean 'momentum'\?\)",
        ),
        ("optim: [1\n", r"--config .*short.yaml: not valid YAML \(while parsing a flow sequence"),
        ("- 1\n- 2\n", r"expected a mapping of config sections .*got a list"),
        ("optim:\n  lr: fast\n", r"short.yaml.optim.lr: expected a number, got 'fast'"),
    ],
)
def test_a_bad_yaml_config_names_the_entry_and_the_closest_valid_one(tmp_path, content, message):
    (tmp_path / "short.yaml").write_text(content)
    with pytest.raises(UserError, match=message):
        parse("--config", str(tmp_path / "short.yaml"))


def test_an_unknown_flag_is_one_line_naming_the_closest_flag_and_a_help_command_that_runs(capsys):
    assert train_main([str(MNIST_RECIPE), "--optim.lrr", "0.1", "--max_epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: unknown flag --optim.lrr; did you mean --optim.lr? "
        f"(`python -m launcher.train {MNIST_RECIPE} --help` lists every flag)\n"
    )  # not its value 0.1, and --max_epochs (tyro accepts underscores) is known
    assert train_main([str(MNIST_RECIPE), "--logging.no-progres-bar"]) == 2
    assert "did you mean --logging.no-progress-bar?" in capsys.readouterr().err


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


# ---- values that parse but make no sense: each is one line naming the flag and the valid range ------------------
NONSENSE = [
    ("--run-name", "../x"),
    ("--run-name", "/abs"),
    ("--run-name", "a/b"),
    ("--run-name", "a\\b"),
    ("--run-name", "."),
    ("--run-name", ".."),
    ("--run-name", ""),
    ("--seed", "-1"),
    ("--seed", str(2**32)),
    ("--optim.lr", "nan"),
    ("--optim.lr", "inf"),
    ("--optim.momentum", "1"),
    ("--optim.momentum", "-0.5"),
    ("--optim.weight-decay", "-0.1"),
    ("--optim.betas", "0.9", "1.0"),
    ("--optim.betas", "-0.1", "0.999"),
    ("--optim.eps", "-1e-8"),
    ("--optim.grad-clip-norm", "-1"),
    ("--optim.grad-clip-norm", "nan"),
    ("--schedule.gamma", "-0.5"),
    ("--schedule.gamma", "0"),
    ("--schedule.gamma", "1.5"),
    ("--schedule.step-size-epochs", "0"),
    ("--schedule.step-size-epochs", "-2"),
    ("--schedule.milestones-epochs", "-1", "2"),
    ("--schedule.warmup-epochs", "-1"),
    ("--schedule.warmup-steps", "-1"),
    ("--schedule.warmup-start-factor", "1.5"),
    ("--schedule.warmup-start-factor", "nan"),
    ("--schedule.min-lr-factor", "nan"),
    ("--schedule.min-lr-factor", "-0.1"),
    ("--schedule.min-lr-factor", "1.5"),
    ("--schedule.plateau-patience", "-1"),
    ("--schedule.plateau-threshold", "-0.1"),
    ("--eval-every-epochs", "-1"),
    ("--eval-every-steps", "-1"),
    ("--early-stopping.patience", "-1"),
    ("--early-stopping.min-delta", "-0.1"),
    ("--data.crop-padding", "-1"),
    ("--data.num-workers", "-1"),
    ("--data.std", "0"),
    ("--data.mean", "nan"),
    ("--checkpoint.every-steps", "-1"),
    ("--checkpoint.every-epochs", "-1"),
    ("--preemption.check-every-steps", "-1"),
    ("--preemption.check-every-steps", "0"),
    ("--preemption.max-requeues", "-1"),
    ("--ema.decay", "nan"),
    ("--ema.warmup-steps", "-1"),
]


@pytest.mark.parametrize("args", NONSENSE, ids=" ".join)
def test_nonsense_values_are_one_line_naming_the_flag(args):
    with pytest.raises(UserError) as exc:
        parse(*args)
    header, *problems = str(exc.value).splitlines()
    assert header == "invalid configuration:"
    assert len(problems) == 1 and problems[0].strip().startswith(args[0] + " must"), problems


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # torch: "Nesterov momentum requires a momentum and zero dampening" (the MNIST recipe sets --optim.nesterov)
        (["--optim.momentum", "0"], "--optim.nesterov needs --optim.momentum above 0"),
        # torch's ReduceLROnPlateau: "Factor should be < 1.0"
        (["--schedule.decay", "plateau", "--schedule.gamma", "1"], "--schedule.gamma must be below 1 for"),
        (["--schedule.warmup", "constant", "--schedule.warmup-start-factor", "0"], "constant warm-up"),
        (["--optim.lr", "inf"], "--optim.lr must be a finite number (got inf)"),
    ],
)
def test_nonsense_combinations_name_the_flags(args, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse(*args)


def test_boundary_values_are_accepted():
    cfg = parse(
        *("--run-name", "mnist-lr0.1_v2", "--seed", str(2**32 - 1), "--optim.no-nesterov", "--optim.momentum", "0"),
        *("--optim.eps", "0", "--optim.betas", "0", "0.999", "--schedule.gamma", "1", "--schedule.min-lr-factor", "1"),
        *("--schedule.warmup-start-factor", "0", "--schedule.warmup-steps", "0", "--eval-every-epochs", "0"),
        *("--checkpoint.every-epochs", "0", "--data.num-workers", "0", "--preemption.max-requeues", "0"),
    )  # fmt: skip
    assert (cfg.run_name, cfg.seed, cfg.schedule.gamma) == ("mnist-lr0.1_v2", 2**32 - 1, 1.0)


@pytest.mark.parametrize(
    "recipe",
    [*sorted((REPO / "recipes").glob("*.py")), TEST_RECIPES / "mlp.py", TEST_RECIPES / "faulty.py"],
    ids=lambda p: p.name,
)
def test_every_recipe_default_is_valid(recipe):
    parse_config(load_recipe(recipe), [], prog="test")


def test_config_that_is_a_directory_or_not_utf8_names_the_file(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    with pytest.raises(
        UserError,
        match=r"--config .*run is a directory; pass a YAML file \(see --print-config\) or a run's config\.json",
    ):
        parse("--config", str(tmp_path / "run"))
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"is a directory; pass .*run/config\.json"):  # the one inside it
        parse("--config", str(tmp_path / "run"))
    (tmp_path / "latin1.json").write_bytes('{"run_name": "café"}'.encode("latin-1"))
    with pytest.raises(UserError, match=r"--config .*latin1\.json: not UTF-8 text"):
        parse("--config", str(tmp_path / "latin1.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"--config .*list\.json: expected a mapping of config sections"):
        parse("--config", str(tmp_path / "list.json"))
    assert train_main([str(MNIST_RECIPE), "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --config") and "Traceback" not in err


# ---- recipes that misbehave: the error is the recipe's, labelled so, without the launcher's frames --------------
def test_recipe_with_a_syntax_error_shows_its_file_line_and_caret(tmp_path, capsys):
    recipe = tmp_path / "typo.py"
    recipe.write_text(
        "from launcher.config import TrainConfig\n\nconfig = TrainConfig()\ndef build_model(cfg)\n"
    )
    assert train_main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"recipe {recipe} has a syntax error" in err
    assert f'File "{recipe}", line 4' in err and "def build_model(cfg)" in err and "^" in err
    assert "SyntaxError" in err and "importlib" not in err and "<frozen" not in err


def test_recipe_that_exits_while_loading_is_an_error_not_success(capsys):
    assert train_main([str(TEST_RECIPES / "exits_on_import.py")]) == 2
    err = capsys.readouterr().err
    assert "exits_on_import.py called sys.exit(0) while loading (line 8)" in err
    assert 'if __name__ == "__main__":' in err and "Traceback" not in err


def run_faulty(tmp_path: Path, fault: str, *extra: str) -> int:
    return train_main([str(TEST_RECIPES / "faulty.py"), "--fault", fault, "--output-dir", str(tmp_path),
                       "--run-name", "r", "--logging.no-progress-bar", "--logging.trackers", *extra])  # fmt: skip


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (
            "model-raises",
            ["faulty.py: build_model raised:\nTraceback", "in _layer_sizes", "KeyError: 'hidden-sizes'"],
        ),
        ("datasets-raise", ["faulty.py: build_datasets raised:\nTraceback", "RuntimeError: faulty recipe"]),
    ],
)
def test_recipe_builder_that_raises_shows_the_recipes_traceback(tmp_path, capsys, fault, expected):
    assert run_faulty(tmp_path, fault) == 2
    err = capsys.readouterr().err
    assert all(text in err for text in expected), err
    # From the recipe's frame on: the launcher's frames above it are not the user's business.
    assert "launcher/train.py" not in err and "launcher/recipe.py" not in err


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (
            "model-not-module",
            "faulty.py: build_model returned a dict, not a torch.nn.Module; return the model",
        ),
        ("model-exits", "faulty.py: build_model called sys.exit(3)"),
        (
            "datasets-wrong-type",
            "faulty.py: build_datasets returned a tuple, not a launcher.recipe.Datasets; "
            "return Datasets(train=..., eval=...)",
        ),
        (
            "datasets-not-map-style",
            "faulty.py: build_datasets returned a train set of type generator without "
            "len(); return a map-style dataset (__len__ and __getitem__)",
        ),
        # The recipe's own UserError (missing data, say) is already the user's message: it passes unchanged.
        (
            "model-user-error",
            "error: faulty recipe: no pretrained weights at /nowhere; pass --weights PATH\n",
        ),
    ],
)
def test_recipe_builder_that_returns_the_wrong_thing_is_one_line(tmp_path, capsys, fault, message):
    assert run_faulty(tmp_path, fault) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_recipe_builders_are_checked_in_the_test_phase_and_the_other_commands(tmp_path, capsys):
    assert (
        run_faulty(tmp_path, "model-not-module", "--phase", "test", "--weights", str(tmp_path / "w.pt")) == 2
    )
    assert "build_model returned a dict" in capsys.readouterr().err
    faulty = str(TEST_RECIPES / "faulty.py")
    assert (
        launcher_main(["plot-lr", faulty, "--fault", "datasets-wrong-type", "-o", str(tmp_path / "lr.png")])
        == 2
    )
    assert "build_datasets returned a tuple" in capsys.readouterr().err
    with pytest.raises(UserError, match="build_model returned a dict"):
        check_recipe({}, [faulty, "--fault", "model-not-module"], None, "x.pt")
