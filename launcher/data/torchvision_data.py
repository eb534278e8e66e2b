"""torchvision's downloadable datasets (MNIST and its relatives, CIFAR-10 and CIFAR-100) for a recipe: the train
and test splits under `--data.root`, downloaded there when missing, and one line that names the folder, the file
and the fix when they are missing, cannot be downloaded, or are damaged.

torchvision's own messages do not serve a launcher user: "Dataset not found. You can use download=True" names
neither the folder nor the launcher's flag, and a failed MNIST download ends its first line with an empty reason
(the reasons follow on later lines, one per mirror).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, MNIST
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import check_integrity

from launcher.config import DataConfig
from launcher.errors import UserError

DOWNLOAD_TIMEOUT_S = 30.0
"""The longest a download waits for a connection or for the next bytes. urllib, which torchvision downloads
with, waits forever by default: behind a firewall that drops packets a run would hang instead of failing."""


def torchvision_datasets(
    cls: type, data: DataConfig, example: str = "", offline: str = ""
) -> tuple[Dataset, Dataset]:
    """The (train, test) splits of the torchvision dataset `cls` (MNIST, FashionMNIST, KMNIST, CIFAR10,
    CIFAR100) in `data.root`, downloaded there first when files are missing and `data.download` is on. Raises
    UserError with a one-line message when they are missing, the download fails, or a file is damaged.
    `example`: a folder that holds a copy, for the messages; `offline`: another fix that needs no copy."""
    root = Path(data.root)
    folder, files = _layout(cls, root)
    name = re.sub(r"^CIFAR(\d+)$", r"CIFAR-\1", cls.__name__)
    layout = (
        f"{folder.relative_to(root) / files[0]} and the {len(files) - 1} other files of torchvision's layout"
    )
    copy = f"pass --data.root DIR of a folder that holds {layout}" + (f" (e.g. {example})" if example else "")

    def fixes(*ways: str) -> str:
        ways = (*ways, offline) if offline else ways
        return "Fix: " + ", ".join(ways[:-1]) + f", or {ways[-1]}"

    missing = [f for f in files if not (folder / f).is_file()]
    where = f"{name} not found in {folder}"
    if missing and not data.download:
        more = f" and {len(missing) - 1} more of its {len(files)} files" if len(missing) > 1 else ""
        raise UserError(
            f"{where} (missing: {missing[0]}{more}) and --data.no-download is set. "
            + fixes(copy, f"drop --data.no-download to download {name} into {root}")
        )
    if missing:
        timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            cls(root, train=True, download=True)  # downloads both splits
        except Exception as exc:  # any failure of the download: its reason goes into the message
            raise UserError(
                f"{where} and downloading it failed ({_reason(exc)}). "
                + fixes(copy, "run once where the download site is reachable")
            ) from None
        finally:
            socket.setdefaulttimeout(timeout)
    try:
        return cls(root, train=True), cls(root, train=False)
    except Exception as exc:  # the files are there, so one of them is damaged (or unreadable)
        bad, why = _damaged(cls, folder, files) or (None, _reason(exc))
        what = f"{name} file {bad}" if bad else f"a {name} file in {folder}"
        again = f"delete it and run again without --data.no-download to download {name} afresh"
        raise UserError(f"{what} is damaged or unreadable ({why}). {fixes(again, copy)}") from None


def _layout(cls: type, root: Path) -> tuple[Path, list[str]]:
    """The folder a torchvision dataset keeps its files in, and their names (the training images first)."""
    if issubclass(cls, MNIST) and cls.download is MNIST.download:  # EMNIST and QMNIST download other files
        return root / cls.__name__ / "raw", [Path(url).stem for url, _ in cls.resources]
    if issubclass(cls, CIFAR10):
        files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return root / cls.base_folder, files
    raise TypeError(f"torchvision_datasets does not know the file layout of {cls.__name__}")


def _damaged(cls: type, folder: Path, files: list[str]) -> tuple[Path, str] | None:
    """The first file that fails torchvision's check (CIFAR: its MD5; MNIST: parsing it), and why."""
    for f in files:
        try:
            if issubclass(cls, CIFAR10):
                md5 = dict(cls.train_list + cls.test_list) | {cls.meta["filename"]: cls.meta["md5"]}
                if not check_integrity(str(folder / f), md5[f]):
                    return folder / f, "its MD5 checksum is not the published one"
            else:
                (read_image_file if "-images-" in f else read_label_file)(str(folder / f))
        # Whatever reading raises: a truncated idx file gives a shape error, junk an empty AssertionError.
        except Exception as exc:
            return folder / f, _reason(exc)
    return None


def _reason(exc: BaseException) -> str:
    """An exception as one non-empty line: its message (every line of it) with its type, or its type alone."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
