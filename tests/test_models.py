"""A model by import path (--model.target / --model.kwargs): importing, building, and every error message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from digit_folders import write_digit_folders
from safetensors.torch import load_file
from torch import nn

from conftest import REPO, metrics, train
from launcher.errors import UserError
from launcher.models import build_from_target, check_output, import_target
from launcher.recipe import load_config_file, load_recipe, parse_config

NETS = '''
import torch
from torch import nn


class Net(nn.Module):
    """A two-layer perceptron for 1x16x16 images."""

    def __init__(self, hidden: int = 64, num_classes: int = 10):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(256, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.layers(x)


class Outer:
    class Inner(nn.Linear):
        pass


class Explodes(nn.Module):
    def __init__(self):
        super().__init__()
        raise ValueError("no weights for you")


def make_dict():
    return {"not": "a module"}


LAZY = nn.LazyLinear
'''


@pytest.fixture(scope="module")
def nets_pkg(tmp_path_factory) -> Path:
    """A real package `h8nets` (nets.py; broken.py imports a package that does not exist)."""
    root = tmp_path_factory.mktemp("pkgs")
    (root / "h8nets").mkdir()
    (root / "h8nets" / "__init__.py").write_text("")
    (root / "h8nets" / "nets.py").write_text(NETS)
    (root / "h8nets" / "broken.py").write_text("import torch\nimport h8_not_installed_dependency\n")
    return root


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory, mnist_root) -> Path:
    return write_digit_folders(tmp_path_factory.mktemp("digits"), mnist_root, {"train": 30, "val": 10})


@pytest.fixture
def on_path(nets_pkg, monkeypatch):
    monkeypatch.syspath_prepend(str(nets_pkg))
    yield
    for name in [m for m in sys.modules if m == "h8nets" or m.startswith("h8nets.")]:
        del sys.modules[name]


def test_builds_a_class_with_keyword_arguments(on_path):
    model = build_from_target("h8nets.nets.Net", {"hidden": 7, "num_classes": 3})
    assert type(model).__module__ == "h8nets.nets" and type(model).__name__ == "Net"
    assert model.layers[1].out_features == 7
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 3)


def test_builds_from_a_function_and_a_nested_class(on_path):
    resnet = build_from_target("torchvision.models.resnet18", {"num_classes": 5})
    assert resnet.fc.out_features == 5
    inner = build_from_target("h8nets.nets.Outer.Inner", {"in_features": 2, "out_features": 4})
    assert isinstance(inner, nn.Linear) and inner.weight.shape == (4, 2)


def test_not_a_dotted_path():
    with pytest.raises(UserError, match=r"--model.target 'Net' is not a dotted import path.*mypkg.nets.Net"):
        import_target("Net")


def test_missing_package_names_path_and_module(on_path):
    with pytest.raises(UserError) as exc:
        import_target("h8_nowhere.nets.Net")
    message = str(exc.value)
    assert "--model.target h8_nowhere.nets.Net" in message
    assert "no module named 'h8_nowhere'" in message and "PYTHONPATH" in message


def test_missing_submodule_names_it(on_path):
    with pytest.raises(UserError, match=r"h8nets.nope.Net: .*no module named 'h8nets.nope'"):
        import_target("h8nets.nope.Net")


def test_missing_class_names_the_module_file_and_suggests(on_path, nets_pkg):
    with pytest.raises(UserError) as exc:
        import_target("h8nets.nets.Nett")
    message = str(exc.value)
    assert "module 'h8nets.nets'" in message and str(nets_pkg / "h8nets" / "nets.py") in message
    assert "no attribute 'Nett'" in message and "did you mean Net" in message
    assert "nn.Module classes: Explodes, LAZY, Net" in message


def test_module_that_fails_to_import_shows_its_own_traceback(on_path, nets_pkg):
    with pytest.raises(UserError) as exc:
        import_target("h8nets.broken.Net")
    message = str(exc.value)
    assert "module 'h8nets.broken' was found but failed to import" in message
    assert str(nets_pkg / "h8nets" / "broken.py") in message and "line 2" in message
    assert "No module named 'h8_not_installed_dependency'" in message
    assert "importlib" not in message  # its frames are noise


def test_kwargs_that_do_not_fit_show_the_signature(on_path):
    with pytest.raises(UserError) as exc:
        build_from_target("h8nets.nets.Net", {"hiden": 3})
    message = str(exc.value)
    assert (
        '--model.kwargs {"hiden": 3} do not fit h8nets.nets.Net(hidden: int = 64, num_classes: int = 10)'
        in message
    )
    assert "unexpected keyword argument 'hiden'" in message


def test_constructor_errors_and_non_modules(on_path):
    with pytest.raises(
        UserError, match=r"(?s)h8nets.nets.Explodes: building it .* raised:.*nets.py.*no weights"
    ):
        build_from_target("h8nets.nets.Explodes", {})
    with pytest.raises(UserError, match=r"h8nets.nets.make_dict returned a dict, not a torch.nn.Module"):
        build_from_target("h8nets.nets.make_dict", {})


def test_check_output_catches_a_wrong_class_count_and_initialises_lazy_modules(on_path):
    model = build_from_target("h8nets.nets.Net", {"num_classes": 3})
    with pytest.raises(UserError, match=r"\(batch, 10\) class logits .* gave \(1, 3\).*\"num_classes\": 10"):
        check_output(model, (1, 16, 16), 10, "--model.target h8nets.nets.Net")
    assert model.training  # the probe's eval mode is undone
    lazy = nn.Sequential(nn.Flatten(), build_from_target("h8nets.nets.LAZY", {"out_features": 10}))
    check_output(lazy, (1, 16, 16), 10, "lazy")
    assert lazy[1].weight.shape == (10, 256)


def test_kwargs_flag_takes_json_and_round_trips_through_config_json(tmp_path, capsys):
    recipe = load_recipe(REPO / "recipes" / "imagefolder.py")
    cfg = parse_config(
        recipe, ["--model.target", "h8nets.nets.Net", "--model.kwargs", '{"hidden": 256, "act": "gelu"}'], "t"
    )
    assert cfg.model.kwargs == {"hidden": 256, "act": "gelu"}
    (tmp_path / "config.json").write_text(json.dumps({"model": {"target": "x.Y", "kwargs": {"hidden": 3}}}))
    assert load_config_file(tmp_path / "config.json", type(cfg)).model.kwargs == {"hidden": 3}
    for bad, expected in (("{hidden: 1}", "not valid JSON"), ("[1, 2]", "expected a JSON object")):
        with pytest.raises(SystemExit) as exc:
            parse_config(recipe, ["--model.kwargs", bad], "t")
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--model.kwargs" in err and expected in err


@pytest.mark.slow
def test_imagefolder_recipe_trains_an_imported_model_from_pythonpath(nets_pkg, digit_folders, tmp_path):
    """As a user would: a package on PYTHONPATH, the JSON kwargs as one shell word, a fresh process."""
    cmd = [
        sys.executable,
        "-m",
        "launcher.train",
        "recipes/imagefolder.py",
        "--model.target",
        "h8nets.nets.Net",
        "--model.kwargs",
        '{"hidden": 32, "num_classes": 10}',
        "--data.root",
        str(digit_folders / "train"),
        "--data.val-root",
        str(digit_folders / "val"),
        *("--data.channels", "1", "--data.image-size", "16", "--data.mean", "0.13", "--data.std", "0.31"),
        # No random shifts: a perceptron, unlike a CNN, has no translation invariance to learn them with.
        *("--data.no-hflip", "--data.crop-padding", "0", "--data.batch-size", "25", "--max-epochs", "2"),
        *("--output-dir", tmp_path, "--run-name", "imported", "--logging.no-progress-bar"),
    ]
    env = {**os.environ, "PYTHONPATH": str(nets_pkg), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        list(map(str, cmd)), cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "imported"
    assert json.loads((run / "config.json").read_text())["model"]["kwargs"] == {
        "hidden": 32,
        "num_classes": 10,
    }
    final = metrics(run, "final")[-1]
    assert final["samples"] == 100 and final["accuracy"] >= 0.5, final  # chance: 0.1
    # The imported Net, not the recipe's CNN, is what was trained and saved.
    best = load_file(run / "best.safetensors")
    assert {k: tuple(v.shape) for k, v in best.items()} == {
        "layers.1.weight": (32, 256),
        "layers.1.bias": (32,),
        "layers.3.weight": (10, 32),
        "layers.3.bias": (10,),
    }


def test_missing_target_through_the_cli(digit_folders, tmp_path, capsys):
    code = train(
        REPO / "recipes" / "imagefolder.py",
        "--model.target",
        "h8_nowhere.Net",
        "--data.root",
        digit_folders / "train",
        "--output-dir",
        tmp_path,
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model.target h8_nowhere.Net: cannot import module 'h8_nowhere'")
    assert "Traceback" not in err
