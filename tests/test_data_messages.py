"""Missing, undownloadable and damaged torchvision datasets stop the run with one line that names the folder or
file and the fix (`launcher.data.torchvision_datasets`, which recipes/mnist.py and recipes/cifar10.py use)."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest
from torchvision.datasets import CIFAR10, MNIST

import launcher.data.torchvision_data as torchvision_data
from conftest import REPO, train

MNIST_RECIPE, CIFAR_RECIPE = REPO / "recipes" / "mnist.py", REPO / "recipes" / "cifar10.py"


def error_line(capsys, recipe: Path, root: Path, tmp_path: Path, *extra: str) -> str:
    """The one line a run that cannot get its data prints (it exits with status 2, without a traceback)."""
    assert train(recipe, "--data.root", root, "--output-dir", tmp_path / "runs", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_mnist_not_found_without_downloads_names_the_folder_the_file_and_both_fixes(capsys, tmp_path):
    root = tmp_path / "nowhere"
    err = error_line(capsys, MNIST_RECIPE, root, tmp_path, "--data.no-download")
    assert err == (
        f"error: MNIST not found in {root / 'MNIST' / 'raw'} (missing: train-images-idx3-ubyte and 3 more of its 4 "
        "files) and --data.no-download is set. Fix: pass --data.root DIR of a folder that holds MNIST/raw/train-images-idx3-ubyte and the 3 "
        "other files of torchvision's layout (e.g. ../shared/data/mnist-mini), or drop --data.no-download to "
        f"download MNIST into {root}"
    )
    assert not root.exists()  # nothing was created or downloaded


@pytest.fixture
def refused_mirror(monkeypatch) -> str:
    """An MNIST mirror that refuses connections: a real download failure, whether or not this machine is online
    (without a network the real mirrors fail just as fast, in well under a second: the name does not resolve)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/"
    monkeypatch.setattr(MNIST, "mirrors", [url])
    return url


def test_mnist_download_failure_gives_its_reason_and_the_fixes(capsys, tmp_path, refused_mirror):
    root = tmp_path / "empty"
    start = time.perf_counter()
    err = error_line(capsys, MNIST_RECIPE, root, tmp_path)
    assert time.perf_counter() - start < 30  # not a benchmark: a hang would take the socket timeout or longer
    assert err.startswith(
        f"error: MNIST not found in {root / 'MNIST' / 'raw'} and downloading it failed (RuntimeError: Error "
        f"downloading train-images-idx3-ubyte.gz: Tried {refused_mirror}, got: <urlopen error [Errno 111] "
    )
    assert err.endswith(
        "Fix: pass --data.root DIR of a folder that holds MNIST/raw/train-images-idx3-ubyte and the 3 other "
        "files of torchvision's layout (e.g. ../shared/data/mnist-mini), or run once where the download site is "
        "reachable"
    )
    assert "could not be downloaded" not in err and "download=True" not in err


def test_a_stalled_download_fails_after_the_socket_timeout(capsys, tmp_path, monkeypatch):
    """A server that accepts the connection and never answers (a firewall that drops packets behaves alike)
    would hang urllib for ever without a socket timeout."""
    monkeypatch.setattr(torchvision_data, "DOWNLOAD_TIMEOUT_S", 0.5)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # the kernel completes the handshake; nobody ever reads the request
        monkeypatch.setattr(MNIST, "mirrors", [f"http://127.0.0.1:{server.getsockname()[1]}/"])
        err = error_line(capsys, MNIST_RECIPE, tmp_path / "empty", tmp_path)
    assert "downloading it failed (TimeoutError: timed out)" in err
    assert socket.getdefaulttimeout() is None  # restored


def test_a_truncated_mnist_file_is_named_with_the_fix(capsys, tmp_path, mnist_root):
    root = tmp_path / "copy"
    shutil.copytree(mnist_root, root)
    damaged = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    with damaged.open("r+b") as f:
        f.truncate(3000)  # the header says 8,000 images of 28x28
    err = error_line(capsys, MNIST_RECIPE, root, tmp_path)
    assert err == (
        f"error: MNIST file {damaged} is damaged or unreadable (RuntimeError: shape '[8000, 28, 28]' is invalid "
        "for input of size 2984). Fix: delete it and run again without --data.no-download to download MNIST "
        "afresh, or pass --data.root DIR of a folder that holds MNIST/raw/train-images-idx3-ubyte and the 3 "
        "other files of torchvision's layout (e.g. ../shared/data/mnist-mini)"
    )


def test_an_mnist_file_that_is_not_an_idx_file_is_named(capsys, tmp_path, mnist_root):
    root = tmp_path / "copy"
    shutil.copytree(mnist_root, root)
    damaged = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    damaged.write_text("<html>404 Not Found</html>")  # what a proxy sometimes serves instead
    err = error_line(capsys, MNIST_RECIPE, root, tmp_path, "--data.no-download")
    # torchvision's parser fails with an empty AssertionError: the type stands in for the empty message.
    assert err.startswith(
        f"error: MNIST file {damaged} is damaged or unreadable (AssertionError). Fix: delete"
    )


def test_cifar10_not_found_names_the_folder_and_the_flags(capsys, tmp_path):
    root = tmp_path / "nowhere"
    err = error_line(capsys, CIFAR_RECIPE, root, tmp_path, "--data.no-download")
    assert err == (
        f"error: CIFAR-10 not found in {root / 'cifar-10-batches-py'} (missing: data_batch_1 and 6 more of its 7 "
        "files) and --data.no-download is set. Fix: pass --data.root DIR of a folder that holds cifar-10-batches-py/data_batch_1 and the 6 "
        f"other files of torchvision's layout, drop --data.no-download to download CIFAR-10 into {root}, or use "
        "--data.fake-samples 256 for an offline smoke run on random images"
    )


def test_a_damaged_cifar10_file_is_named(capsys, tmp_path):
    folder = tmp_path / "cifar" / CIFAR10.base_folder
    folder.mkdir(parents=True)
    for name in (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ):
        (folder / name).write_bytes(b"")  # present, so no download is tried
    (folder / "batches.meta").write_bytes(b"")
    err = error_line(capsys, CIFAR_RECIPE, tmp_path / "cifar", tmp_path)
    assert err.startswith(
        f"error: CIFAR-10 file {folder / 'data_batch_1'} is damaged or unreadable (its MD5 checksum is not the "
        "published one). Fix: delete it and run again"
    )
