"""recipes/imagefolder.py on PNG digits written from mnist-mini: it learns, it splits deterministically, and
every layout mistake (missing or empty folder, missing class, unreadable image) is an error naming it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from digit_folders import write_digit_folders

from conftest import REPO, metrics, train
from launcher.data.image_folder import ClassFolders, ImageFolderData, open_image_folders, split_by_class
from launcher.errors import UserError

RECIPE = REPO / "recipes" / "imagefolder.py"
# Digits: one channel, no flips (a mirrored 7 is no 7), MNIST's statistics, 16x16 pixels for short CPU runs.
DIGITS = (
    *("--data.channels", "1", "--data.no-hflip", "--data.mean", "0.1307", "--data.std", "0.3081"),
    *("--data.image-size", "16", "--data.crop-padding", "1", "--logging.no-progress-bar"),
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory, mnist_root) -> Path:
    """train/digit<k>/: 30 PNG digits per class; val/digit<k>/: 10 other ones per class."""
    return write_digit_folders(tmp_path_factory.mktemp("digits"), mnist_root, {"train": 30, "val": 10})


def copy_of(digits: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(digits, tmp_path / "copy"))


@pytest.mark.slow
def test_learns_digits_from_folders_and_logs_the_class_names(digits, tmp_path):
    args = ("--data.root", digits / "train", "--data.val-root", digits / "val", *DIGITS)
    args += ("--model.width", "8", "--data.batch-size", "25", "--max-epochs", "4", "--output-dir", tmp_path)
    assert train(RECIPE, *args, "--run-name", "digits") == 0
    run = tmp_path / "digits"
    final = metrics(run, "final")[-1]
    assert final["samples"] == 100
    assert final["accuracy"] >= 0.3, final  # chance is 0.1; about 0.7 is usual after these 48 steps
    assert metrics(run, "setup")[0]["steps_per_epoch"] == 12  # 300 training images / 25
    log = (run / "train.log").read_text()
    assert "10 classes (label: folder): 0: digit0, 1: digit1, 2: digit2" in log
    assert f"300 training images from {digits / 'train'}, 100 validation images ({digits / 'val'})" in log


def test_images_are_resized_and_converted_on_load(digits):
    folder = ClassFolders(digits / "train", image_size=12, channels=3)
    image, label = folder[0]
    assert (image.size, image.mode, label) == ((12, 12), "RGB", 0)
    assert folder.classes == [f"digit{k}" for k in range(10)]
    grey, _ = ClassFolders(digits / "train", image_size=12, channels=1)[0]
    assert grey.mode == "L"


def test_split_is_per_class_deterministic_and_disjoint(digits):
    folder = ClassFolders(digits / "train", image_size=16, channels=1)
    train_a, val_a = split_by_class(folder, 0.2, seed=0)
    train_b, val_b = split_by_class(folder, 0.2, seed=0)
    _, val_c = split_by_class(folder, 0.2, seed=1)
    assert val_a.samples == val_b.samples and train_a.samples == train_b.samples
    assert val_a.samples != val_c.samples
    assert (len(train_a), len(val_a)) == (240, 60)
    assert not {p for p, _ in train_a.samples} & {p for p, _ in val_a.samples}
    assert torch.bincount(torch.tensor(val_a.targets)).tolist() == [6] * 10  # 20% of each class's 30
    assert val_a.classes == folder.classes and val_a[0][0].size == (16, 16)


def test_split_through_the_recipe_options(digits):
    cfg = ImageFolderData(
        root=digits / "train", val_fraction=0.1, split_seed=3, channels=1, mean=(0.5,), std=(0.2,)
    )
    train_set, val_set = open_image_folders(cfg)
    assert (len(train_set), len(val_set)) == (270, 30)
    with pytest.raises(UserError, match=r"--data.val-fraction must be between 0 and 1 \(got 1.0\)"):
        open_image_folders(ImageFolderData(root=digits / "train", val_fraction=1.0, mean=(), std=()))


def test_missing_and_empty_folders_are_named(digits, tmp_path):
    with pytest.raises(
        UserError, match=rf"image folder {tmp_path / 'nope'} \(--data.root\) does not exist; expected"
    ):
        ClassFolders(tmp_path / "nope", 16, 1)
    (tmp_path / "flat").mkdir()
    shutil.copy(next((digits / "train" / "digit0").iterdir()), tmp_path / "flat" / "a.png")
    with pytest.raises(
        UserError, match="has no class folders; it holds 1 images directly: move them into one"
    ):
        ClassFolders(tmp_path / "flat", 16, 1)
    root = copy_of(digits, tmp_path)
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    (root / "train" / "digit3" / "notes.txt").write_text("")
    for png in (root / "train" / "digit3").glob("*.png"):
        png.unlink()
    with pytest.raises(UserError) as exc:
        ClassFolders(root / "train", 16, 1)
    assert (
        f"class folder(s) {root / 'train' / 'digit3'} (--data.root) hold no images (looked for .jpg"
        in str(exc.value)
    )


def test_validation_folder_with_a_missing_class_is_refused(digits, tmp_path, capsys):
    root = copy_of(digits, tmp_path)
    shutil.rmtree(root / "val" / "digit7")
    shutil.copytree(root / "val" / "digit1", root / "val" / "seven")
    code = train(
        RECIPE,
        "--data.root",
        root / "train",
        "--data.val-root",
        root / "val",
        *DIGITS,
        "--output-dir",
        tmp_path,
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: validation folder {root / 'val'} (--data.val-root) lacks class folder(s) digit7"
    )
    assert f"and has class folder(s) seven that {root / 'train'} lacks" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("in_memory", [True, False])
def test_unreadable_image_is_named(digits, tmp_path, capsys, in_memory):
    root = copy_of(digits, tmp_path)
    broken = root / "train" / "digit5" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    args = ("--data.root", root / "train", "--data.val-root", root / "val", *DIGITS, "--output-dir", tmp_path)
    # Streaming checks every file's header up front: later, a worker's error would come back wrapped.
    args += () if in_memory else ("--data.no-in-memory", "--data.num-workers", "1")
    assert train(RECIPE, *args) == 2
    err = capsys.readouterr().err
    if in_memory:
        assert err.startswith(f"error: cannot read image {broken}: cannot identify image file")
        assert "Repair or remove the file" in err
    else:
        assert err.startswith(
            f"error: cannot read 1 image(s) (--data.root); repair or remove them:\n  {broken} ("
        )
    assert "Traceback" not in err


def test_normalisation_must_fit_the_channels(digits):
    cfg = ImageFolderData(root=digits / "train", channels=1, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    with pytest.raises(UserError, match=r"--data.mean has 3 values but --data.channels is 1"):
        open_image_folders(cfg)
