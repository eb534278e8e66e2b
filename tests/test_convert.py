"""`launcher convert-ckpt` / `inspect-ckpt` and the safe reader under the trainer's `--weights`.

Real files: the 13 checkpoints from public repositories in ../shared/data/checkpoints-wild (never unpickled with
weights_only=False: the autouse guard below fails any test that tries), plus checkpoints saved here from real
models (nn.DataParallel, tied weights, whole pickled modules, malicious pickles, hostile safetensors).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import pickle
import re
import shlex
import struct
import sys
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import REPO, train
from launcher.checkpoint import safe_load
from launcher.checkpoint.safe_load import check_safetensors_header, load_checkpoint, pickle_globals
from launcher.checkpoint.state_dict import (
    ALIASES_KEY,
    load_into,
    rename_prefix,
    split_weights,
    strip_prefixes,
    untie,
)
from launcher.checkpoint.weights import read_weights
from launcher.errors import UserError
from launcher.recipe import load_recipe, parse_config
from launcher.tools import cli, convert_ckpt, inspect_ckpt

WILD = REPO.parent / "shared" / "data" / "checkpoints-wild"
MNIST_RECIPE = REPO / "recipes" / "mnist.py"
SMALL_MNIST = ["--model.channels", "4", "--model.hidden", "8"]  # the mnist recipe's CNN, small and fast
REAL_TORCH_LOAD = torch.load


@pytest.fixture(autouse=True)
def never_unpickle_wild_files_unsafely(monkeypatch):
    """Fail loudly if anything calls torch.load without weights_only=True on a wild file or an in-memory copy."""

    def guarded(f, *args, **kwargs):
        wild = not isinstance(f, (str, Path)) or Path(f).resolve().is_relative_to(WILD.resolve())
        if kwargs.get("weights_only") is not True and wild:
            raise AssertionError(f"torch.load({f!r}) without weights_only=True")
        return REAL_TORCH_LOAD(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded)


def run_convert(capsys, *argv) -> tuple[int, str, str]:
    code = convert_ckpt.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_inspect(capsys, *argv) -> tuple[int, str, str]:
    code = inspect_ckpt.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def mnist_model() -> nn.Module:
    recipe = load_recipe(MNIST_RECIPE)
    return recipe.build_model(parse_config(recipe, SMALL_MNIST, prog="test"))


def assert_equal_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---- pure functions ------------------------------------------------------------------------------------------------
def test_strip_prefixes_only_whole_segments_at_the_start():
    t = torch.zeros(1)
    state = {
        "module.features.module.0.weight": t,  # DataParallel around a model that itself wraps `features`
        "module._orig_mod.fc.weight": t,  # DataParallel around torch.compile: both go, in any order
        "_orig_mod.module.head.bias": t,
        "module.submodule.x": t,
    }
    assert list(strip_prefixes(state)) == [
        "features.module.0.weight",
        "fc.weight",
        "head.bias",
        "submodule.x",
    ]
    # opacus's GradSampleModule: `_module.` is not `module.`, and `modules.` is a different word.
    assert list(strip_prefixes({"_module.0.weight": t, "modules.0.bias": t})) == [
        "_module.0.weight",
        "modules.0.bias",
    ]


def test_strip_and_rename_collisions_name_both_keys():
    t = torch.zeros(1)
    with pytest.raises(
        UserError, match=r"'module\.fc\.weight' and 'fc\.weight'|'fc\.weight' and 'module\.fc\.weight'"
    ):
        strip_prefixes({"fc.weight": t, "module.fc.weight": t})
    with pytest.raises(UserError, match=r"'a\.w' and 'b\.w' to 'b\.w'"):
        rename_prefix({"a.w": t, "b.w": t}, "a.", "b.")


def test_wrapper_dicts_unwrap_only_when_unambiguous():
    sd = {"w": torch.zeros(1)}
    key, state, extras = split_weights({"net": sd, "acc": 91.0, "epoch": 3})
    assert key == "net" and state == sd and extras == {"acc": 91.0, "epoch": 3}
    both = {"state_dict": sd, "state_dict_ema": sd, "epoch": 1}
    with pytest.raises(
        UserError, match=r"candidates: \['state_dict', 'state_dict_ema'\]\. Name one with --key"
    ):
        split_weights(both)
    assert split_weights(both, key="state_dict_ema")[0] == "state_dict_ema"
    with pytest.raises(UserError, match=r"has no entry 'nope'"):
        split_weights(both, key="nope")


def test_metadata_values_are_strings_and_tensor_entries_are_left_out():
    value = convert_ckpt.metadata_value
    assert value(np.float64(0.25)) == ("0.25", "")
    assert value(torch.tensor(3)) == ("3", "")
    assert value(argparse.Namespace(lr=0.1, arch="resnet")) == ('{"lr": 0.1, "arch": "resnet"}', "")
    assert value([np.float32(1.5), 2]) == ("[1.5, 2]", "")
    assert (
        value({"state": {}, "param_groups": [{"lr": 0.1}]})[0] is None
    )  # optimizer state, even without tensors
    assert value({"mean": torch.zeros(2)}) == (None, "holds tensors (convert it on its own with --key)")
    assert value(list(range(100_000)))[0] is None  # over the size limit


def test_untie_stores_tied_tensors_once_and_copies_other_shared_memory():
    tied = torch.randn(4, 3)
    buffer = torch.arange(10.0)
    state = {
        "emb.weight": tied,
        "head.weight": tied,
        "a": buffer[:4],
        "b": buffer[4:],
        "t": torch.arange(6.0).reshape(2, 3).t(),
        "empty1": torch.zeros(0),
        "empty2": torch.zeros(0),
    }
    stored, aliases, contiguous = untie(state)
    assert aliases == {"head.weight": "emb.weight"}
    assert set(stored) == {"emb.weight", "a", "b", "t", "empty1", "empty2"}
    assert stored["a"].untyped_storage().data_ptr() != stored["b"].untyped_storage().data_ptr()
    assert contiguous == 1 and stored["t"].is_contiguous() and torch.equal(stored["t"], state["t"])


def test_pickle_globals_reads_names_without_running_anything():
    assert pickle_globals(pickle.dumps(argparse.Namespace, protocol=2)) == ["argparse.Namespace"]
    assert pickle_globals(pickle.dumps(argparse.Namespace, protocol=4)) == [
        "argparse.Namespace"
    ]  # STACK_GLOBAL
    assert pickle_globals(pickle.dumps({1, 2}, protocol=2)) == ["builtins.set"]  # Python 2 name mapped back


# ---- the 13 wild checkpoints -----------------------------------------------------------------------------------
# file -> (entry holding the weights, tensor count, first key after conversion, metadata that must be carried).
# Counts, keys and values are those MANIFEST.md lists from its own inspection.
CONVERTS = {
    "dp_kuangliu_lenet_emnist_ckpt.pth": (
        "net",
        10,
        "conv1.weight",
        {"acc": "89.96157251790274", "epoch": "99"},
    ),
    "dp_bearpaw_resnet_model_best.pth.tar": (
        "state_dict",
        128,
        "conv1.weight",
        {"epoch": "256", "acc": "95.44", "best_acc": "95.44"},
    ),
    "dp_bare_legacy_simplenet_model_best.pth.tar": (None, 260, "features.0.0.weight", {}),
    "dp_bare_legacy_linear_tiny.pt": (None, 2, "weight", {}),
    "dp_py2era_imagenet_style_plain8.pth.tar": (
        "state_dict",
        37,
        "conv1.weight",
        {"epoch": "80", "arch": "plainnet8", "best_prec1": "86.47"},
    ),
    "opacus_imagenet_style_numpy_model_best.pth.tar": (
        "state_dict",
        10,
        "_module.0.weight",  # opacus's prefix is kept: it is not DataParallel's
        {"epoch": "468", "arch": "Convnet"},
    ),
    "cgcnn_legacy_band_gap.pth.tar": (
        "state_dict",
        46,
        "embedding.weight",
        {"epoch": "457", "best_mae_error": "0.3689685452196309"},
    ),
    "stepbystep_model_state_dict_numpy2.pth": ("model_state_dict", 2, "0.weight", {"epoch": "200"}),
    "model_state_dict_only_cifar10.pth": ("model_state_dict", 10, "conv_layers.0.weight", {}),
    "ffjord_args_namespace_checkpt.pth": ("state_dict", 22, "chain.0.sqrt_end_time", {}),
    "plain_lenet_cifar10_checkpoint.pt": (None, 10, "conv1.weight", {}),
}
# file -> fragments of the one-line error (convert-ckpt, inspect-ckpt and read_weights alike).
FAILS = {
    "whole_module_zip_mnist_full_model.pth": [
        "whole pickled model whose class __main__.MnistModel",
        "not even with --unsafe-load-pickled-code",
    ],
    "whole_module_legacy_morvan_net.pkl": [
        "holds a whole pickled model (torch.save(model))",
        "torch.nn.modules.container.Sequential",
        "If you trust the file: launcher convert-ckpt",
        "--unsafe-load-pickled-code",
    ],
}
CONVERTS_OPACUS = "opacus_imagenet_style_numpy_model_best.pth.tar"
# numpy 2 renamed numpy.core to numpy._core (numpy 1.x has no numpy._core; 1.26 only a stub)
MULTIARRAY = importlib.import_module(
    "numpy._core.multiarray" if np.__version__ >= "2" else "numpy.core.multiarray"
)
# Extras the numpy/argparse allowlist lets through and the test uses as an independent reference reader.
NUMPY_AND_ARGPARSE = [
    (MULTIARRAY.scalar, "numpy.core.multiarray.scalar"),
    (MULTIARRAY.scalar, "numpy._core.multiarray.scalar"),
    np.dtype,
    type(np.dtype("float64")),  # numpy.dtypes.Float64DType (a public name from numpy 1.25 on)
    argparse.Namespace,
]


@pytest.fixture(scope="module")
def wild() -> Path:
    if not WILD.is_dir():
        pytest.fail(f"the real-checkpoint fixture {WILD} is missing (it lives in ../shared beside the repo)")
    return WILD


def test_every_wild_file_is_covered_and_unchanged(wild):
    files = {p.name for p in wild.iterdir() if p.name != "MANIFEST.md"}
    assert files == set(CONVERTS) | set(FAILS), "a wild file without an expected outcome, or a stray file"
    manifest = (wild / "MANIFEST.md").read_text()
    for name, digest in re.findall(r"^([0-9a-f]{64})  (\S+)$", manifest, re.M):
        assert hashlib.sha256((wild / digest).read_bytes()).hexdigest() == name, f"{digest} was modified"


@pytest.mark.parametrize("name", sorted(CONVERTS))
def test_wild_file_converts_and_matches_an_independent_read(wild, tmp_path, capsys, name):
    entry, count, first_key, metadata = CONVERTS[name]
    out = tmp_path / "out.safetensors"
    code, stdout, err = run_convert(capsys, wild / name, "-o", out)
    assert code == 0, err
    assert f"read back: all {count} equal (torch.equal)" in stdout

    converted = load_file(out)  # the safetensors library's own reader, not ours
    assert len(converted) == count and first_key in converted
    with safe_open(out, "pt") as f:
        header = f.metadata()
    assert metadata.items() <= header.items()
    assert header["launcher.source"] == name and header.get("launcher.weights_key") == entry
    assert header["launcher.source_sha256"] == hashlib.sha256((wild / name).read_bytes()).hexdigest()

    if name.startswith("dp_py2era"):
        # torch cannot read this file safely at all, so check against the raw bytes: every tensor's data is in
        # the file, and the values that came through the rewritten pickle opcodes are the manifest's.
        raw = (wild / name).read_bytes()
        for k, t in converted.items():
            assert raw.find(t.numpy().tobytes()) > 0, k
        obj = load_checkpoint(wild / name).obj
        assert 140164103678976 in obj["optimizer"]["state"]  # a Python-2 `INT` opcode, read as the same int
        assert all(converted[k].min() > 0 for k in converted if k.endswith("running_var"))
    else:
        with torch.serialization.safe_globals(NUMPY_AND_ARGPARSE):
            obj = torch.load(wild / name, map_location="cpu", weights_only=True)
        reference = obj[entry] if entry else obj
        expected = {k.removeprefix("module."): v for k, v in reference.items()}
        assert_equal_state(converted, expected)

    # The trainer's --weights reads the original file to the same tensors, without converting first.
    assert_equal_state(read_weights(wild / name), converted)


# The __main__ file is also tried with the flag: it must be refused before anything is unpickled (the guard
# fixture fails the test otherwise). The legacy Sequential file is not: with the flag it *would* be unpickled.
@pytest.mark.parametrize(
    ("name", "unsafe"),
    [(name, False) for name in sorted(FAILS)] + [("whole_module_zip_mnist_full_model.pth", True)],
)
def test_wild_whole_modules_fail_with_the_documented_message(wild, tmp_path, capsys, name, unsafe):
    out = tmp_path / "out.safetensors"
    flag = ["--unsafe-load-pickled-code"] if unsafe else []
    code, _, err = run_convert(capsys, wild / name, "-o", out, *flag)
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    for fragment in FAILS[name]:
        assert fragment in err
    with pytest.raises(UserError) as exc:
        read_weights(wild / name)
    assert all(fragment in str(exc.value) for fragment in FAILS[name])


@pytest.mark.parametrize("name", sorted(CONVERTS) + sorted(FAILS))
def test_inspect_every_wild_file(wild, capsys, name):
    code, out, err = run_inspect(capsys, wild / name)
    if name in FAILS:
        assert code == 2 and "needs:" in out and FAILS[name][0] in err
        return
    entry, count, _first, metadata = CONVERTS[name]
    assert code == 0, err
    where = f"entry {entry!r}" if entry else "the whole file (a bare state dict)"
    assert f"weights:   {where}: {count} tensors" in out
    for key in metadata:
        assert f"entry:     {key} = " in out
    dp = name.startswith("dp_")
    assert f"module. {count if dp else 0}/{count}" in out
    if name.startswith("opacus"):
        assert "every key starts with '_module.', left as is (--rename _module.= drops it)" in out
    if name.startswith("dp_py2era"):
        assert "46 text INT opcodes" in out


def test_opacus_prefix_is_removed_only_on_request(wild, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    code, stdout, _ = run_convert(capsys, wild / CONVERTS_OPACUS, "-o", out, "--rename", "_module.=")
    assert code == 0 and "renamed '_module.' -> '' on 10 keys" in stdout
    assert {"0.weight", "0.bias", "9.weight"} <= set(load_file(out))


def test_numpy_and_argparse_extras_need_the_allowlist(wild):
    """Control: without our allowlist torch refuses these files, so the conversions above prove it works."""
    for name in (
        "stepbystep_model_state_dict_numpy2.pth",
        CONVERTS_OPACUS,
        "ffjord_args_namespace_checkpt.pth",
    ):
        with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
            torch.load(wild / name, map_location="cpu", weights_only=True)


def test_argparse_namespace_goes_to_metadata_as_json(wild, tmp_path, capsys):
    out = tmp_path / "f.safetensors"
    assert run_convert(capsys, wild / "ffjord_args_namespace_checkpt.pth", "-o", out)[0] == 0
    with safe_open(out, "pt") as f:
        args = json.loads(f.metadata()["args"])
    assert isinstance(args, dict) and "layer_type" in args and "dims" in args


# ---- the round trips the issue asks for ------------------------------------------------------------------------
def test_dataparallel_checkpoint_loads_into_the_plain_model(tmp_path, capsys):
    model = mnist_model()
    src = tmp_path / "ckpt.pth"
    torch.save(
        {
            "net": nn.DataParallel(model).state_dict(),
            "acc": np.float64(97.5),
            "epoch": 3,
            "args": argparse.Namespace(lr=0.1),
        },
        src,
    )
    out = tmp_path / "plain.safetensors"
    code, stdout, err = run_convert(capsys, src, "-o", out, "--check", MNIST_RECIPE, *SMALL_MNIST)
    assert code == 0, err
    assert "stripped 'module.' from 25 of 25 keys" in stdout
    assert "loads into the recipe's model with strict=True" in stdout
    fresh = mnist_model()
    fresh.load_state_dict(load_file(out), strict=True)
    assert_equal_state(dict(fresh.state_dict()), dict(model.state_dict()))


def test_plain_state_dict_with_added_prefix_loads_into_dataparallel(tmp_path, capsys):
    model = mnist_model()
    src = tmp_path / "plain.safetensors"
    save_file(dict(model.state_dict()), src)
    out = tmp_path / "dp.pt"
    code, _, err = run_convert(capsys, src, "--add-prefix", "module.", "-o", out, "--format", "pt")
    assert code == 0, err
    wrapped = nn.DataParallel(mnist_model())
    wrapped.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert_equal_state(dict(wrapped.module.state_dict()), dict(model.state_dict()))


def test_launcher_checkpoint_exports_to_a_plain_pt(tmp_path, capsys, mnist_root):
    code = train(
        MNIST_RECIPE,
        *SMALL_MNIST,
        "--data.root",
        mnist_root,
        "--max-steps",
        "2",
        "--output-dir",
        tmp_path,
        "--run-name",
        "run",
        "--logging.trackers",
        "--logging.no-progress-bar",
    )
    assert code == 0
    step = tmp_path / "run" / "checkpoints" / "step-00000002"
    capsys.readouterr()
    out = tmp_path / "mnist.pt"
    code, _, err = run_convert(capsys, step, "-o", out)
    assert code == 0, err
    model = mnist_model()
    model.load_state_dict(torch.load(out, weights_only=True))  # plain PyTorch, nothing from launcher
    assert_equal_state(dict(model.state_dict()), load_file(step / "model.safetensors"))
    # The trainer's --weights and inspect-ckpt take the checkpoint folder itself.
    assert_equal_state(read_weights(step), load_file(step / "model.safetensors"))
    code, stdout, _ = run_inspect(capsys, step)
    assert (
        code == 0
        and "format:    safetensors, read safely" in stdout
        and "metadata:  format=pt, step=2 (safetensors header)" in stdout
    )


def test_trainer_weights_accept_a_wrapped_dataparallel_file_with_numpy_extras(tmp_path, capsys, mnist_root):
    model = mnist_model()
    path = tmp_path / "model_best.pth.tar"
    torch.save(
        {
            "epoch": 7,
            "arch": "cnn",
            "state_dict": nn.DataParallel(model).state_dict(),
            "best_acc1": np.float64(0.98),
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict(),
            "args": argparse.Namespace(lr=0.1, epochs=90),
        },
        path,
    )
    with pytest.raises(pickle.UnpicklingError):  # control: plain weights_only loading refuses this file
        torch.load(path, weights_only=True)
    code = train(
        MNIST_RECIPE,
        *SMALL_MNIST,
        "--phase",
        "test",
        "--weights",
        path,
        "--data.root",
        mnist_root,
        "--output-dir",
        tmp_path / "runs",
        "--run-name",
        "t",
        "--logging.trackers",
        "--logging.no-progress-bar",
    )
    assert code == 0
    assert "test  " in capsys.readouterr().out


def test_tied_weights_are_stored_once_and_come_back_tied(tmp_path, capsys):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    src = tmp_path / "tied.pt"
    torch.save(model.state_dict(), src)
    out = tmp_path / "tied.safetensors"
    code, stdout, _ = run_convert(capsys, src, "-o", out)
    assert code == 0 and "tied: 'head.weight' is 'emb.weight', stored once" in stdout
    assert list(load_file(out)) == ["emb.weight"]  # stored once in the file
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()[ALIASES_KEY]) == {"head.weight": "emb.weight"}
    code, stdout, _ = run_inspect(capsys, out)
    assert code == 0 and "weights:   the whole file (a bare state dict): 2 tensors" in stdout
    fresh = Tied()
    load_into(fresh, read_weights(out), source=str(out))
    assert torch.equal(fresh.head.weight, model.emb.weight) and fresh.head.weight is fresh.emb.weight

    pt = tmp_path / "tied_copy.pt"
    assert run_convert(capsys, src, "-o", pt)[0] == 0
    back = torch.load(pt, weights_only=True)
    assert back["head.weight"].data_ptr() == back["emb.weight"].data_ptr()


def test_rename_from_the_issue_moves_a_wrapped_submodule(tmp_path, capsys):
    """torchvision's imagenet example wraps only `features` in DataParallel: keys `features.module.0.weight`."""

    def net(wrap: bool) -> nn.Module:
        m = nn.Module()
        features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
        m.features = nn.DataParallel(features) if wrap else features
        m.classifier = nn.Linear(2, 3)
        return m

    saved = net(wrap=True)
    src = tmp_path / "alexnet.pth.tar"
    torch.save({"state_dict": saved.state_dict(), "epoch": 1}, src)
    out = tmp_path / "alexnet.safetensors"
    code, _, err = run_convert(
        capsys, src, "--key", "state_dict", "--rename", "features.module.=module.features.", "-o", out
    )
    assert code == 0, err
    plain = net(wrap=False)
    plain.load_state_dict(load_file(out), strict=True)
    assert torch.equal(plain.features[0].weight, saved.features.module[0].weight)


def test_check_reports_keys_that_do_not_fit(wild, tmp_path, capsys):
    out = tmp_path / "lenet.safetensors"
    code, _, err = run_convert(
        capsys, wild / "plain_lenet_cifar10_checkpoint.pt", "-o", out, "--check", MNIST_RECIPE, *SMALL_MNIST
    )
    assert code == 1 and out.exists()
    assert (
        "missing keys (" in err
        and "unexpected keys (10): conv1.bias, conv1.weight" in err
        and "0.weight" in err
    )


def test_a_strip_that_collides_is_an_error_naming_both(tmp_path, capsys):
    src = tmp_path / "mixed.pt"
    torch.save({"module.fc.weight": torch.zeros(2), "fc.weight": torch.ones(2)}, src)
    code, _, err = run_convert(capsys, src, "-o", tmp_path / "x.safetensors")
    assert code == 2 and "'fc.weight'" in err and "'module.fc.weight'" in err
    assert not (tmp_path / "x.safetensors").exists()


# ---- output safety ---------------------------------------------------------------------------------------------
def test_default_output_names_and_the_input_is_never_overwritten(wild, tmp_path, capsys):
    src = tmp_path / "old.pth.tar"
    src.write_bytes((wild / "dp_bare_legacy_linear_tiny.pt").read_bytes())
    before = src.read_bytes()
    assert run_convert(capsys, src)[0] == 0 and (tmp_path / "old.safetensors").is_file()
    assert run_convert(capsys, src, "--format", "pt")[0] == 0 and (tmp_path / "old.converted.pt").is_file()
    code, _, err = run_convert(capsys, tmp_path / "old.safetensors")  # would write old.safetensors again
    assert code == 2 and "that is the input" in err
    code, _, err = run_convert(capsys, src, "-o", src, "--overwrite")
    assert code == 2 and "that is the input" in err
    code, _, err = run_convert(capsys, src, "-o", tmp_path / "old.converted.pt")
    assert code == 2 and "pass --overwrite" in err
    assert run_convert(capsys, src, "-o", tmp_path / "old.converted.pt", "--overwrite")[0] == 0
    assert src.read_bytes() == before
    assert oct((tmp_path / "old.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_read_back_leaves_the_old_output_and_no_temporary_file(tmp_path, capsys, monkeypatch):
    src = tmp_path / "w.pt"
    torch.save({"w": torch.arange(4.0)}, src)
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"old output")

    def corrupt(path):
        tensors, meta = safe_load.read_safetensors(path)
        return {k: v + 1 for k, v in tensors.items()}, meta

    monkeypatch.setattr(convert_ckpt, "read_safetensors", corrupt)
    code, _, err = run_convert(capsys, src, "-o", out, "--overwrite")
    assert code == 2 and "tensor 'w' differs after reading back" in err
    assert out.read_bytes() == b"old output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt", "w.safetensors"]


# ---- unsafe input ----------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def malicious_file(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    marker = tmp_path / f"PWNED-{kind}"
    obj = {"state_dict": {"fc.weight": torch.zeros(2, 2)}, "epoch": 1, "note": Payload(marker)}
    path = tmp_path / f"evil-{kind}.pth"
    if kind == "zip":
        torch.save(obj, path)
    elif kind == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    return path, marker


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_the_malicious_payload_is_live(tmp_path, monkeypatch, kind):
    """Control: a plain torch.load runs it, and the environment variable makes torch.load(path) do so."""
    path, marker = malicious_file(tmp_path, kind)
    REAL_TORCH_LOAD(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.warns(UserWarning, match="forcing weights_only=False"):
        REAL_TORCH_LOAD(path)
    assert marker.exists()


@pytest.mark.parametrize("env", [None, "1"])
@pytest.mark.parametrize("kind", ["zip", "legacy", "raw-pickle"])
def test_a_malicious_pickle_never_runs(tmp_path, capsys, monkeypatch, kind, env):
    if env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", env)
    path, marker = malicious_file(tmp_path, kind)
    code, _, err = run_convert(capsys, path, "-o", tmp_path / "out.safetensors")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "posix.system" in err or "plain Python pickle" in err
    assert run_inspect(capsys, path)[0] == 2
    with pytest.raises(UserError):
        read_weights(path)
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_a_malicious_pickle_never_runs_under_the_launcher_command(tmp_path):
    """The installed entry point in a fresh process with the environment variable set, as a user would run it."""
    import subprocess

    path, marker = malicious_file(tmp_path, "zip")
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    cmd = [
        sys.executable,
        "-m",
        "launcher.tools.cli",
        "convert-ckpt",
        str(path),
        "-o",
        str(tmp_path / "o.safetensors"),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "posix.system" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_whole_pickled_module_needs_the_opt_in_flag(tmp_path, capsys, legacy):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    src = tmp_path / "net.pkl"
    torch.save({"model": model, "epoch": 5}, src, _use_new_zipfile_serialization=not legacy)
    out = tmp_path / "net.safetensors"
    code, _, err = run_convert(capsys, src, "-o", out)
    assert code == 2 and "whole pickled model" in err and "--unsafe-load-pickled-code" in err
    assert not out.exists()
    code, stdout, err = run_convert(capsys, src, "-o", out, "--unsafe-load-pickled-code")
    assert code == 0, err
    assert "runs any code the file contains" in err  # the risk is named when the flag is used
    assert "weights under 'model'" in stdout
    assert_equal_state(load_file(out), dict(model.state_dict()))
    with safe_open(out, "pt") as f:
        assert f.metadata()["epoch"] == "5"


def test_a_main_class_is_refused_before_anything_is_unpickled(tmp_path, capsys, monkeypatch):
    class MainNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

    MainNet.__module__, MainNet.__qualname__ = "__main__", "MainNet"
    monkeypatch.setattr(sys.modules["__main__"], "MainNet", MainNet, raising=False)
    src = tmp_path / "full_model.pth"
    torch.save(MainNet(), src)
    monkeypatch.delattr(sys.modules["__main__"], "MainNet")

    calls = []
    monkeypatch.setattr(
        torch, "load", lambda f, **kw: calls.append(kw["weights_only"]) or REAL_TORCH_LOAD(f, **kw)
    )
    code, _, err = run_convert(capsys, src, "-o", tmp_path / "o.safetensors", "--unsafe-load-pickled-code")
    assert code == 2 and "__main__.MainNet" in err and "not even with --unsafe-load-pickled-code" in err
    assert calls == [True]  # only the safe attempt


def test_torchscript_archives_are_refused(tmp_path, capsys):
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript with a FutureWarning
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(nn.Linear(2, 2)).save(path)
    code, _, err = run_convert(capsys, path, "-o", tmp_path / "o.safetensors")
    assert code == 2 and "TorchScript archive" in err


# ---- hostile safetensors ---------------------------------------------------------------------------------------
def _safetensors(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


F32_2 = {"dtype": "F32", "shape": [2]}
HOSTILE = {
    "empty": (b"", "the file is empty (0 bytes)"),
    "shorter-than-a-length": (b"\x01\x02\x03", "too short for a safetensors file"),
    "length-past-the-end": (_safetensors({}, length=50_000), "runs past the end of the"),
    "length-over-100MB": (_safetensors(b"{}", length=2**63), "is over the 100,000,000-byte limit"),
    "not-json": (_safetensors(b"\xff\xfe{{not json"), "header is not valid JSON"),
    "json-list": (_safetensors([1, 2]), "header is a JSON list, not an object"),
    "overlapping-offsets": (
        _safetensors(
            {"a": {**F32_2, "data_offsets": [0, 8]}, "b": {**F32_2, "data_offsets": [4, 12]}}, bytes(12)
        ),
        "tensors 'a' and 'b' overlap",
    ),
    "offsets-past-the-data": (
        _safetensors({"a": {**F32_2, "data_offsets": [0, 8]}}, bytes(4)),
        "truncated file",
    ),
    "shape-and-offsets-disagree": (
        _safetensors({"a": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 8]}}, bytes(8)),
        "needs 4e+12 bytes but its offsets span 8",
    ),
    "unknown-dtype": (
        _safetensors({"a": {"dtype": "X9", "shape": [], "data_offsets": [0, 0]}}),
        "unknown dtype",
    ),
    # Each of these gave a traceback (RecursionError, TypeError: unhashable, ValueError) or reached the library.
    "nested-100k-deep": (_safetensors(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nests deeper"),
    "dtype-is-a-list": (
        _safetensors({"a": {"dtype": ["F32"], "shape": [], "data_offsets": [0, 4]}}, bytes(4)),
        "unknown dtype ['F32']",
    ),
    "dtype-is-an-object": (
        _safetensors({"a": {"dtype": {"F32": 1}, "shape": [], "data_offsets": [0, 4]}}, bytes(4)),
        "unknown dtype {'F32': 1}",
    ),
    "integer-of-5000-digits": (
        _safetensors(b'{"a":{"dtype":"U8","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,1]}}', bytes(1)),
        "header is not valid JSON",
    ),
    "bool-in-shape": (
        _safetensors({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4)),
        "is not a list of non-negative integers",
    ),
}


def test_a_truncated_real_safetensors_file_is_refused(tmp_path, capsys):
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    assert run_convert(capsys, path, "-o", tmp_path / "ok.pt")[0] == 0  # control: the whole file converts
    path.write_bytes(path.read_bytes()[:-100])
    code, _, err = run_convert(capsys, path, "-o", tmp_path / "o.pt")
    assert code == 2 and "truncated file" in err and err.count("\n") == 1


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_safetensors_give_one_line_errors(tmp_path, capsys, monkeypatch, case):
    content, message = HOSTILE[case]
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(content)

    def never(*args, **kwargs):
        raise AssertionError("the safetensors library was handed a file that failed validation")

    monkeypatch.setattr(safe_load, "load_file", never)
    for run in (run_convert, run_inspect):
        code, _, err = run(capsys, path, *(["-o", tmp_path / "o.pt"] if run is run_convert else []))
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err
    with pytest.raises(UserError, match=re.escape(message)):
        read_weights(path)


@pytest.mark.parametrize("length", [2**63, 99_999_999])
def test_a_huge_header_length_allocates_nothing(tmp_path, length):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(_safetensors(b"{}", length=length))
    tracemalloc.start()
    try:
        with pytest.raises(UserError):
            check_safetensors_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000


# ---- the command line ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [convert_ckpt, inspect_ckpt])
def test_help_explains_every_option_with_an_example(module, capsys):
    parser = module.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert "Example" in (action.help or ""), f"{action.option_strings or action.dest} has no example"
    command = "convert-ckpt" if module is convert_ckpt else "inspect-ckpt"
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: launcher {command}" in text and "examples:" in text
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text


def test_the_launcher_usage_lists_both_commands(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "convert-ckpt" in text and "inspect-ckpt" in text


def test_bad_rename_and_missing_input_are_one_line_errors(wild, tmp_path, capsys):
    tiny = wild / "dp_bare_legacy_linear_tiny.pt"
    code, _, err = run_convert(capsys, tiny, "-o", tmp_path / "o.pt", "--rename", "nothing.=x.")
    assert code == 2 and "no key starts with 'nothing.'" in err
    code, _, err = run_convert(capsys, tiny, "-o", tmp_path / "o.pt", "--rename", "no-equals-sign")
    assert code == 2 and "expected OLD=NEW" in err
    code, _, err = run_convert(capsys, tmp_path / "missing.pt")
    assert code == 2 and "'" + str(tmp_path / "missing.pt") + "' not found" in err
    code, _, err = run_convert(capsys, tmp_path)
    assert code == 2 and "not a launcher checkpoint (it has no model.safetensors)" in err
