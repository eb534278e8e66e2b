"""Files, written so that a crash never leaves half of one, and JSON-lines files read back.

The one atomic writer of the project (checkpoint pointers, best/EMA weights, converted checkpoints) and the one
JSON-lines reader (metrics.jsonl, requeues.jsonl, sweeps, plots) live here, at the bottom of the import graph.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync(path: Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path,
    write: Callable[[Path], Any],
    tmp: Path | None = None,
    check: Callable[[Path], Any] | None = None,
) -> None:
    """Write `path` through a temporary file beside it: `write(tmp)`, fsync, `check(tmp)` if given (read it back,
    say), rename over `path`, fsync the folder. A crash leaves the old file or the complete new one; a failure
    removes the temporary file and raises.

    The file gets the mode any new file gets here (the umask applied), also when `write` goes through a private
    temporary file of its own (safetensors writes 0600). The mode is read off the freshly created temporary file:
    reading the umask itself means setting it, which is not safe while other threads create files."""
    path = Path(path)
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb"):
            pass
        mode = tmp.stat().st_mode & 0o777
        write(tmp)
        if tmp.stat().st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
        fsync(tmp)
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def write_json_atomic(path: Path, data: Any, tmp: Path | None = None) -> None:
    """`data` as indented JSON, atomically (see write_atomic)."""
    text = json.dumps(data, indent=2) + "\n"
    write_atomic(path, lambda p: p.write_text(text), tmp=tmp)


def read_jsonl(path: Path, keep: Callable[[Any], bool] | None = None) -> tuple[list[Any], list[int]]:
    """(the records of a JSON-lines file, the numbers of the lines that are not JSON or that `keep` refuses). A
    process killed while appending leaves half a line; the lines around it still count, and the caller decides
    whether to say so."""
    records, bad = [], []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if keep is None or keep(record):
            records.append(record)
        else:
            bad.append(number)
    return records, bad
