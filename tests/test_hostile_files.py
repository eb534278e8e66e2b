"""Checkpoint files crafted to break `inspect-ckpt` / `convert-ckpt` (found by adversarial probing).

Each hostile file must end in a one-line `error: ...` (exit status 2), run nothing, crash nothing and stay within
bounded time and memory. Files that could crash the process (a forged numpy dtype) or whose memory use is the
point (a zip bomb) are read by the real command line in a subprocess, so a segfault shows as a negative return
code and the peak RSS is the subprocess's own.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import shlex
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO
from launcher.checkpoint import safe_load
from launcher.checkpoint.safe_load import load_checkpoint
from launcher.checkpoint.state_dict import ALIASES_KEY
from launcher.checkpoint.weights import read_weights
from launcher.errors import UserError
from launcher.tools import convert_ckpt, inspect_ckpt

# Runs `launcher.tools.cli.main` (what the `launcher` command runs) once per argv in sys.argv[1] (a JSON list), and
# prints one JSON line per run: exit status, stderr, and the process's peak RSS so far in bytes. One process for
# several runs, because importing torch costs seconds on a shared machine.
CLI_DRIVER = r"""
import contextlib, io, json, resource, sys
from launcher.tools import cli, convert_ckpt, inspect_ckpt  # imported before the first peak, like the runs' own code

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB

print(json.dumps({"rc": None, "stderr": "", "peak": peak()}), flush=True)
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    print(json.dumps({"rc": rc, "stderr": err.getvalue(), "peak": peak()}), flush=True)
"""


def run_cli(*runs: list[str | Path], timeout: int = 120) -> list[dict[str, Any]]:
    """[baseline, one dict per run]; fails the test if the subprocess died (a segfault: a negative return code)."""
    argvs = [[str(a) for a in argv] for argv in runs]
    result = subprocess.run(
        [sys.executable, "-c", CLI_DRIVER, json.dumps(argvs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0, (
        f"the CLI process died with status {result.returncode} after {len(lines) - 1} of {len(runs)} runs "
        f"(negative: killed by that signal):\n{result.stderr[-3000:]}"
    )
    return lines


def assert_one_line_error(rc: int | None, err: str) -> None:
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def run_main(capsys, module, *argv) -> tuple[int, str, str]:
    code = module.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


class Reduce:
    """Pickles as `func(*args)`, then BUILD with `state` if one is given: how a crafted file spells any call."""

    def __init__(self, func: Any, args: tuple, state: Any = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple:
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


# ---- 15: numpy dtypes ------------------------------------------------------------------------------------------
SCALAR = importlib.import_module(
    "numpy._core.multiarray" if np.__version__ >= "2" else "numpy.core.multiarray"
).scalar
# The state numpy's dtype.__setstate__ takes: (version, byte order, subarray, names, fields, itemsize, alignment,
# flags). These give 8 raw bytes a field "a" of Python objects; flags 0 keeps numpy from noticing, so the bytes
# the file supplies are later used as a PyObject pointer.
OBJECT_FIELD = (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0)
OBJECT_SUBARRAY = (3, "|", (np.dtype("O"), (1,)), None, None, 8, 1, 0)
# Plain fields and subarrays far past the 8 bytes that the scalar has: numpy reads outside its buffer.
FAR_FIELD = (3, "|", None, ("a",), {"a": (np.dtype("f8"), 1 << 30)}, 8, 1, 0)
HUGE_SUBARRAY = (3, "|", (np.dtype("f8"), (1 << 27,)), None, None, 8, 1, 0)
# Forged dtypes that point numpy at memory the file controls. numpy never writes these; a crafted pickle can.
MEMORY_FORGERIES = {
    "void-with-object-field": Reduce(np.dtype, ("V8", False, True), OBJECT_FIELD),
    "float64-rebuilt-with-object-field": Reduce(np.dtype, ("f8", False, True), OBJECT_FIELD),
    "float64-rebuilt-with-object-subarray": Reduce(np.dtype, ("f8", False, True), OBJECT_SUBARRAY),
    "float64-rebuilt-with-a-field-at-1-GiB": Reduce(np.dtype, ("f8", False, True), FAR_FIELD),
    "float64-rebuilt-with-a-1-GiB-subarray": Reduce(np.dtype, ("f8", False, True), HUGE_SUBARRAY),
}
# Dtypes numpy does write, but that are not plain numbers: refused too, each with a one-line error.
NOT_PLAIN = {
    "object": np.dtype("O"),
    "structured": np.dtype([("x", "<f4"), ("y", "<f4")]),
    "unicode": np.dtype("U2"),
    "datetime": np.dtype("M8[s]"),
}


def checkpoint_with_scalar(path: Path, dtype: Any, data: bytes) -> Path:
    """A real torch.save file whose extra entry "acc" is the pickled call numpy.scalar(dtype, data)."""
    torch.save({"state_dict": {"w": torch.zeros(2)}, "acc": Reduce(SCALAR, (dtype, data))}, path)
    return path


def test_forged_numpy_dtypes_are_one_line_errors_not_crashes(tmp_path):
    files = {
        name: checkpoint_with_scalar(tmp_path / f"{name}.pth", dtype, b"AAAAAAAA")
        for name, dtype in MEMORY_FORGERIES.items()
    }
    runs = []
    for path in files.values():
        runs += [["inspect-ckpt", path], ["convert-ckpt", path, "-o", tmp_path / f"{path.stem}.safetensors"]]
    results = run_cli(*runs)[1:]
    for argv, result in zip(runs, results, strict=True):
        assert_one_line_error(result["rc"], result["stderr"])
        assert "numpy dtype" in result["stderr"] and "likely malicious" in result["stderr"], argv
        assert "--unsafe-load-pickled-code" not in result["stderr"], argv
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize("kind", sorted(NOT_PLAIN))
def test_numpy_scalars_that_are_not_plain_numbers_are_refused(tmp_path, capsys, kind):
    dtype = NOT_PLAIN[kind]
    path = checkpoint_with_scalar(tmp_path / "ckpt.pth", dtype, bytes(dtype.itemsize))
    for module, extra in ((inspect_ckpt, []), (convert_ckpt, ["-o", tmp_path / "o.safetensors"])):
        code, _, err = run_main(capsys, module, path, *extra)
        assert_one_line_error(code, err)
        assert "numpy dtype" in err
    with pytest.raises(UserError, match="numpy dtype"):
        load_checkpoint(path)


def test_plain_numeric_numpy_values_still_load(tmp_path):
    values = {
        str(t.__name__): t(1)
        for t in (
            np.bool_,
            np.int8,
            np.int16,
            np.int32,
            np.int64,
            np.uint8,
            np.uint16,
            np.uint32,
            np.uint64,
            np.float16,
            np.float32,
            np.float64,
            np.longdouble,
            np.complex64,
            np.complex128,
        )
    }
    big_endian = Reduce(SCALAR, (np.dtype(">f8"), np.array(2.5, ">f8").tobytes()))
    path = tmp_path / "numpy.pth"
    extras = {"values": values, "big_endian": big_endian, "dtype": np.dtype("float32")}
    torch.save({"state_dict": {"w": torch.zeros(2)}, **extras}, path)
    obj = load_checkpoint(path).obj
    for name, value in values.items():
        assert type(obj["values"][name]) is type(value) and obj["values"][name] == value, name
    assert obj["big_endian"] == 2.5
    assert isinstance(obj["dtype"], np.dtype) and obj["dtype"] == np.float32  # a bare dtype comes back real


# ---- 16: hostile safetensors headers ------------------------------------------------------------------------------
def safetensors_bytes(raw_header: bytes, data_size: int) -> bytes:
    return struct.pack("<Q", len(raw_header)) + raw_header + bytes(data_size)


def many_tensors_header(n: int) -> bytes:
    """A header of n one-byte tensors, built as bytes (json.dumps of 10^5 dicts would be the slow part)."""
    entries = (b'"t%d":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}' % (i, i, i + 1) for i in range(n))
    return b"{" + b",".join(entries) + b"}"


def forbid_json_parsing(monkeypatch) -> None:
    def parse(*args, **kwargs):
        raise AssertionError("the header was parsed: its size should have been refused before")

    monkeypatch.setattr(safe_load.json, "loads", parse)


@pytest.mark.parametrize("case", ["tensors", "values"])
def test_headers_over_the_work_caps_are_refused_before_parsing(tmp_path, capsys, monkeypatch, case):
    path = tmp_path / "big.safetensors"
    if case == "tensors":  # one-byte tensors, two over the cap (the count before parsing allows __metadata__)
        n = safe_load.MAX_SAFETENSORS_TENSORS + 2
        path.write_bytes(safetensors_bytes(many_tensors_header(n), n))
        message = f"more than {safe_load.MAX_SAFETENSORS_TENSORS:,} tensors"
    else:  # one tensor with a shape of more dimensions than there may be values
        shape = b",".join([b"1"] * (safe_load.MAX_HEADER_VALUES + 2))
        header = b'{"t":{"dtype":"U8","shape":[' + shape + b'],"data_offsets":[0,1]}}'
        path.write_bytes(safetensors_bytes(header, 1))
        message = "more values than"
    forbid_json_parsing(monkeypatch)
    for module, extra in ((inspect_ckpt, []), (convert_ckpt, ["-o", tmp_path / "o.pt"])):
        code, _, err = run_main(capsys, module, path, *extra)
        assert_one_line_error(code, err)
        assert message in err


def test_the_tensor_cap_counts_tensors_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_load, "MAX_SAFETENSORS_TENSORS", 50)
    path = tmp_path / "n.safetensors"
    header = json.loads(many_tensors_header(50))
    # Braces and commas inside strings do not count: 50 tensors and the metadata are at the cap, not over it.
    metadata = {"a": "{[,]}" * 1000}
    path.write_bytes(safetensors_bytes(json.dumps({"__metadata__": metadata, **header}).encode(), 50))
    assert len(safe_load.check_safetensors_header(path)) == 51
    path.write_bytes(safetensors_bytes(many_tensors_header(51), 51))
    with pytest.raises(UserError, match="more than 50 tensors"):
        safe_load.check_safetensors_header(path)


def test_deeply_nested_alias_metadata_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "aliases.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata={ALIASES_KEY: "[" * 100_000 + "]" * 100_000})
    code, _, err = run_main(capsys, inspect_ckpt, path)
    assert_one_line_error(code, err)
    assert f"metadata {ALIASES_KEY!r} is damaged" in err


# ---- 17: zip bombs -----------------------------------------------------------------------------------------------
def deflated_zeros(n_mib: int) -> tuple[bytes, int]:
    """(a raw deflate stream of n_mib MiB of zero bytes, its CRC-32), made without an n_mib-MiB buffer.

    After Z_FULL_FLUSH the compressor starts from an empty window, so every flushed MiB of zeros compresses to
    the same bytes: one block, repeated, then an empty final block.
    """
    zeros = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(n_mib):
        crc = zlib.crc32(zeros, crc)
    return block * n_mib + b"\x03\x00", crc  # 0x03 0x00: a final, empty, fixed-Huffman block


def write_zip(
    path: Path, entries: list[tuple[str, bytes, int, int, int]], claimed: dict[str, int] | None = None
) -> None:
    """A zip written field by field: (name, data as stored, uncompressed size, CRC-32, method 0 or 8) each.

    `claimed` maps a name's end to the compressed size its directory record claims instead of the real one.
    """
    local, central = bytearray(), bytearray()
    for name, data, size, crc, method in entries:
        raw = name.encode()
        packed = next((n for end, n in (claimed or {}).items() if name.endswith("/" + end)), len(data))
        header = struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), size, len(raw), 0
        )
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, packed, size, len(raw), 0, 0,
            0, 0, 0, len(local),
        ) + raw  # fmt: skip
        local += header + raw + data
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))


def zip_bomb(path: Path, member: str, n_mib: int, claimed_ratio: int | None = None) -> Path:
    """A real torch.save file of one small tensor, with `member` (data.pkl, or the tensor's storage data/0)
    replaced by n_mib MiB of deflated zeros; the other records are copied as torch wrote them.

    With `claimed_ratio` the zip directory claims a compressed size n_mib MiB / claimed_ratio, far more than the
    file holds, so that the entry looks only that much compressed.
    """
    base = path.with_suffix(".base")
    torch.save({"w": torch.zeros(2)}, base)
    bomb, crc = deflated_zeros(n_mib)
    entries = []
    with zipfile.ZipFile(base) as z:
        for info in z.infolist():
            if info.filename.endswith("/" + member):
                entries.append((info.filename, bomb, n_mib << 20, crc, zipfile.ZIP_DEFLATED))
            else:
                entries.append((info.filename, z.read(info), info.file_size, info.CRC, zipfile.ZIP_STORED))
    write_zip(path, entries, {member: (n_mib << 20) // claimed_ratio} if claimed_ratio else {})
    return path


def test_zip_bombs_are_refused_without_inflating_them(tmp_path):
    n_mib = 256
    bombs = [
        zip_bomb(tmp_path / "pickle.pth", "data.pkl", n_mib),
        zip_bomb(tmp_path / "storage.pth", "data/0", n_mib),
        # Claims 32 MiB compressed: "only 8x", but the file is under 300 kB.
        zip_bomb(tmp_path / "liar.pth", "data.pkl", n_mib, claimed_ratio=8),
    ]
    for bomb in bombs:
        assert bomb.stat().st_size < n_mib << 11  # over 500x smaller than what it inflates to
    control = tmp_path / "control.pth"
    torch.save({"w": torch.zeros(2)}, control)
    runs = [["inspect-ckpt", control]]
    for bomb in bombs:
        runs += [["inspect-ckpt", bomb], ["convert-ckpt", bomb, "-o", tmp_path / "o.safetensors"]]
    results = run_cli(*runs)
    assert results[1]["rc"] == 0, results[1]["stderr"]  # the control reads, and its peak is the baseline
    baseline = results[1]["peak"]
    for argv, result in zip(runs[1:], results[2:], strict=True):
        grew = result["peak"] - baseline
        assert grew < 32 << 20, f"{argv}: peak RSS grew {grew / 2**20:.0f} MiB for a {n_mib} MiB bomb"
        assert_one_line_error(result["rc"], result["stderr"])
        assert "zip bomb" in result["stderr"], argv


# ---- 18: known-dangerous globals ---------------------------------------------------------------------------------
DANGEROUS = {
    "posix.system": lambda marker: (os.system, (f"touch {shlex.quote(str(marker))}",)),
    "builtins.eval": lambda marker: (eval, (f"open({str(marker)!r}, 'w')",)),
    "builtins.exec": lambda marker: (exec, (f"open({str(marker)!r}, 'w')",)),
    "subprocess.check_call": lambda marker: (subprocess.check_call, (["touch", str(marker)],)),
    "importlib.import_module": lambda marker: (importlib.import_module, ("json",)),
    "builtins.getattr": lambda marker: (getattr, ("", "join")),
}


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("name", sorted(DANGEROUS))
def test_known_dangerous_globals_are_called_likely_malicious(tmp_path, capsys, name, legacy):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    evil = Reduce(*DANGEROUS[name](marker))
    torch.save(
        {"state_dict": {"w": torch.zeros(2)}, "x": evil}, path, _use_new_zipfile_serialization=not legacy
    )
    for module, extra in ((inspect_ckpt, []), (convert_ckpt, ["-o", tmp_path / "o.safetensors"])):
        code, _, err = run_main(capsys, module, path, *extra)
        assert_one_line_error(code, err)
        assert "likely malicious" in err and name in err, err
        assert "--unsafe-load-pickled-code" not in err and "If you trust" not in err, err
    with pytest.raises(UserError, match="likely malicious"):
        read_weights(path)
    assert not marker.exists()


def test_an_unknown_but_harmless_global_still_points_to_the_flag(tmp_path, capsys):
    path = tmp_path / "dated.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "date": datetime.date(2020, 1, 1)}, path)
    code, _, err = run_main(capsys, convert_ckpt, path, "-o", tmp_path / "o.safetensors")
    assert_one_line_error(code, err)
    assert "datetime.date" in err and "--unsafe-load-pickled-code" in err and "malicious" not in err


# ---- also found: an extra entry nested deeper than json.dumps recurses ----------------------------------------
def test_a_deeply_nested_extra_entry_is_left_out_of_the_metadata(tmp_path, capsys):
    """torch.save cannot nest that deep, but a pickle can: n EMPTY_LISTs, then n - 1 APPENDs."""
    path = tmp_path / "deep.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "deep": 0}, path)
    entries = []
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            data = z.read(info)
            # The value 0 of "deep" (opcode BININT1 0) becomes the nested list.
            if info.filename.endswith("/data.pkl"):
                at = data.index(b"K\x00", data.index(b"X\x04\x00\x00\x00deep"))
                data = data[:at] + b"]" * 100_000 + b"a" * 99_999 + data[at + 2 :]
            entries.append((info.filename, data, len(data), zlib.crc32(data), zipfile.ZIP_STORED))
    write_zip(path, entries)
    code, out, err = run_main(capsys, convert_ckpt, path, "-o", tmp_path / "o.safetensors")
    assert code == 0, err
    assert "not carried: deep (nested too deeply to store as text)" in out
    assert run_main(capsys, inspect_ckpt, path)[0] == 0
