"""Reading checkpoint files of any origin without running code from them.

A torch.save file is a pickle, and unpickling can call any function the file names. So every torch.save file is
read with `torch.load(..., weights_only=True)`, passed explicitly: torch only lets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
turn safety off when the caller did not pass `weights_only`. The only way to run a file's code is
`allow_unsafe=True` (`launcher convert-ckpt --unsafe-load-pickled-code`), which the user has to ask for by name.

On top of torch's own allowlist this module accepts:

- a few globals that construct plain values and that real checkpoints are full of: numpy scalars and dtypes (under
  their numpy 1 and numpy 2 module names) and `argparse.Namespace`;
- Python-2-era legacy files, whose pickles hold the text `INT` opcode that the weights-only unpickler does not
  read. The opcodes are rewritten to their binary twins (same values) and the result goes through the same
  weights-only unpickler, so this needs no trust either.

A safetensors header is validated here (size, JSON, dtypes, offsets inside the file and not overlapping) before
the safetensors library sees the file, so a hostile or truncated file costs one short read and gives one line.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import io
import itertools
import json
import math
import pickle
import pickletools
import re
import struct
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from launcher.errors import UserError

# The safetensors library refuses headers over 100 MB; so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000
# Header metadata key under which convert-ckpt records tied tensors: {"alias key": "stored key", ...}.
ALIASES_KEY = "launcher.aliases"
# torch.save's legacy (pre-1.6) format starts with the pickled magic number 0x1950a86a20f9469cfc6c.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
# Bits per element of each safetensors dtype (sub-byte float formats included, so their files validate too).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
PICKLE_OPCODE_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}


@dataclass
class Loaded:
    """What a checkpoint file holds, and how it was read."""

    obj: Any
    """The unpickled object (a state dict, a wrapper dict, ...) or, for safetensors, the dict of tensors."""
    format: str
    """"safetensors", "torch zip" (torch >= 1.6) or "torch legacy" (the pre-1.6 format)."""
    metadata: dict[str, str] = field(default_factory=dict)
    """The safetensors header's metadata (empty for torch.save files)."""
    notes: list[str] = field(default_factory=list)
    """How reading it differed from a plain weights-only load, for inspect-ckpt and convert-ckpt to report."""


# ---- formats --------------------------------------------------------------------------------------------------
def sniff_format(path: Path) -> str:
    """The file's format from its first bytes, not its name: safetensors, torch zip/legacy, torchscript, ..."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if size == 0:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return "damaged zip"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        return "torch zip"
    if head.startswith(LEGACY_MAGIC):
        return "torch legacy"
    if path.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{"):
        return "safetensors"
    if head[:1] == b"\x80":  # PROTO: a pickle, but without torch.save's magic number
        return "plain pickle"
    return "unknown"


def load_checkpoint(path: Path, allow_unsafe: bool = False) -> Loaded:
    """Read any supported checkpoint file. Raises UserError with a one-line reason when it cannot be read safely.

    `allow_unsafe` unpickles with weights_only=False when the safe load fails, and turns any `nn.Module` in the
    result into its state dict; it is the user's explicit choice to trust the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    fmt = sniff_format(path)
    if fmt == "empty":
        raise UserError(f"{path}: the file is empty (0 bytes)")
    if fmt == "safetensors":
        tensors, metadata = read_safetensors(path)
        return Loaded(tensors, fmt, metadata)
    if fmt == "torchscript":
        raise UserError(
            f"{path}: a TorchScript archive (torch.jit.save), not a state dict; loading it runs its TorchScript "
            "code. In code you trust: torch.jit.load(path).state_dict(), then torch.save that"
        )
    if fmt == "damaged zip":
        raise UserError(
            f"{path}: starts like a torch.save zip file but its zip directory is damaged (truncated?)"
        )
    if fmt == "plain pickle":
        raise UserError(
            f"{path}: a plain Python pickle (pickle.dump), not a torch.save file; tensors in such a pickle can only "
            "be rebuilt by running code from it. In code you trust, load it and torch.save its state dict"
        )
    if fmt == "unknown":
        with open(path, "rb") as f:
            head = f.read(8)
        raise UserError(
            f"{path}: not a checkpoint format launcher knows (safetensors, torch.save zip or legacy torch.save); "
            f"it starts with {head!r}"
        )
    try:
        return Loaded(_torch_load_safe(path), fmt)
    except Exception as exc:  # the unpickler raises many kinds; each means "not readable safely as it is"
        reason = _load_error_reason(exc)
    if fmt == "torch legacy" and "Unsupported operand 73" in reason:
        rewritten, count = rewrite_py2_int_opcodes(path)
        try:
            obj = _torch_load_safe(rewritten)
        except Exception as exc:
            reason = _load_error_reason(exc)
        else:
            note = f"Python-2-era pickle: {count} text INT opcodes read as binary integers (same values)"
            return Loaded(obj, fmt, notes=[note])
    needed = unsafe_globals(path, fmt)
    if allow_unsafe:
        return _load_unsafe(path, fmt, needed)
    raise UserError(_explain(path, reason, needed))


def _torch_load_safe(f: Path | BinaryIO) -> Any:
    with torch.serialization.safe_globals(safe_globals()):
        return torch.load(f, map_location="cpu", weights_only=True)


def safe_globals() -> list[Any]:
    """Globals that only build plain values, allowlisted for weights-only loading.

    A numpy scalar is pickled as `scalar(dtype, raw bytes)`; numpy 2 moved it from `numpy.core` to `numpy._core`,
    and a file names whichever numpy wrote it, so both names are mapped to the installed function.
    `argparse.Namespace` is rebuilt as an empty object whose __dict__ is then filled with already-unpickled values.
    """
    out: list[Any] = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:  # no numpy: files holding numpy values fail with a message naming the global
        return out
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    out += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles a dtype's class as numpy.dtypes.Float64DType
    for name in dir(dtypes) if dtypes else ():
        cls = getattr(dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            out.append((cls, f"numpy.dtypes.{name}"))
    return out


def _load_error_reason(exc: Exception) -> str:
    """torch's weights-only errors bury the cause in a paragraph; keep its one informative line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if match:
        text = match.group(1)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else type(exc).__name__
    # "Please use torch.serialization.add_safe_globals(...)" is advice for programmers, not for this tool's users.
    return line.split(" Please use ")[0].rstrip()


def _explain(path: Path, reason: str, needed: list[str]) -> str:
    main = [g for g in needed if g.startswith("__main__.")]
    if main:
        return _main_message(path, main)
    if needed:
        kind = (
            "a whole pickled model (torch.save(model)), not a state dict"
            if any(g.startswith("torch.nn.modules.") for g in needed)
            else "pickled Python objects besides tensors"
        )
        return (
            f"{path}: holds {kind}; reading it would run code from the file to build {_short(needed)}. "
            f"If you trust the file: launcher convert-ckpt {path} --unsafe-load-pickled-code"
        )
    opcode = re.search(r"Unsupported operand (\d+)", reason)
    if opcode:
        name = PICKLE_OPCODE_NAMES.get(int(opcode.group(1)), "?")
        reason += f" (pickle opcode {name}, which the weights-only unpickler does not read)"
    return f"{path}: cannot be read safely with torch.load(weights_only=True): {reason}"


def _main_message(path: Path, main: list[str]) -> str:
    return (
        f"{path}: holds a whole pickled model whose class {main[0]} was defined in the script that saved it "
        "(`__main__`), so it cannot be unpickled here, not even with --unsafe-load-pickled-code. In that script "
        "(or one defining the class), load it and torch.save(model.state_dict(), ...)"
    )


def _short(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _load_unsafe(path: Path, fmt: str, needed: list[str]) -> Loaded:
    main = [g for g in needed if g.startswith("__main__.")]
    if main:  # the unpickler would look the class up in *our* __main__: refuse before running anything
        raise UserError(_main_message(path, main))
    # Printed, not logged, and before unpickling: the user must see it even if what follows goes wrong.
    print(
        f"WARNING: --unsafe-load-pickled-code: unpickling {path} with weights_only=False, which runs any code "
        f"the file contains (it needs {_short(needed) or 'nothing beyond the safe loader'})",
        file=sys.stderr,
        flush=True,
    )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a missing class, a module renamed since the file was written, ...
        raise UserError(
            f"{path}: unpickling failed even without weights_only: {type(exc).__name__}: {exc}"
        ) from None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    elif isinstance(obj, Mapping):
        obj = {k: v.state_dict() if isinstance(v, torch.nn.Module) else v for k, v in obj.items()}
    return Loaded(obj, fmt, notes=["loaded with --unsafe-load-pickled-code (weights_only=False)"])


# ---- pickles, read without being run ---------------------------------------------------------------------------
def _pickle_streams(path: Path, fmt: str) -> list[bytes]:
    """The pickle that holds a torch.save file's object (zip: data.pkl; legacy: the 4th of 5 pickles)."""
    if fmt == "torch zip":
        with zipfile.ZipFile(path) as z:
            # A diagnostic is not worth decompressing a hostile, huge member for.
            pickles = [
                i for i in z.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"
            ]
            return [z.read(i) for i in pickles if i.file_size <= MAX_HEADER_BYTES]
    with open(path, "rb") as f:
        for _ in range(3):  # magic number, protocol version, sys_info
            for _op in pickletools.genops(f):
                pass
        start = f.tell()
        for _op in pickletools.genops(f):
            pass
        end = f.tell()
        f.seek(start)
        return [f.read(end - start)]


def pickle_globals(data: bytes) -> list[str]:
    """Every `module.name` a pickle refers to, in order of first use, found by parsing opcodes (nothing runs).

    GLOBAL carries its name; STACK_GLOBAL (protocol 4) takes the two strings pushed just before it, directly or
    from the memo, which is all a diagnostic needs.
    """
    found: dict[str, None] = {}
    memo: dict[int, Any] = {}
    recent: list[Any] = []
    proto = 0
    for op, arg, _pos in pickletools.genops(data):
        if op.name == "PROTO":
            proto = arg
        if op.name == "GLOBAL":
            module, name = arg.split(" ", 1)
            if proto < 3:  # as pickle and torch do: Python 2 names (__builtin__.set) to Python 3 ones
                module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            found[f"{module}.{name}"] = None
        elif op.name == "STACK_GLOBAL" and len(recent) >= 2:
            found[f"{recent[-2]}.{recent[-1]}"] = None
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            recent.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = recent[-1] if recent else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            recent.append(memo.get(arg))
        else:
            recent.append(None)
        del recent[:-2]
    return list(found)


def unsafe_globals(path: Path, fmt: str) -> list[str]:
    """The globals of a torch.save file that neither torch's allowlist nor `safe_globals()` accepts."""
    try:
        names = [g for data in _pickle_streams(path, fmt) for g in pickle_globals(data)]
    except Exception:  # a damaged pickle: the load error already says what is wrong
        return []
    try:  # private, but it is the exact list the weights-only unpickler checks against
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:
        allowed = set()
    allowed |= {e[1] if isinstance(e, tuple) else f"{e.__module__}.{e.__qualname__}" for e in safe_globals()}
    return [g for g in names if g not in allowed]


def rewrite_py2_int_opcodes(path: Path) -> tuple[io.BytesIO, int]:
    """A copy of a legacy torch.save file with each text `INT` opcode replaced by its binary equivalent.

    Python 2 pickled ints that did not fit 32 bits (here: `id()`-based optimizer keys) as `I<digits>\\n`, and
    `I01`/`I00` for True/False. Pickle has no byte offsets (the memo is indexed by number), so swapping one opcode
    for another of a different length is safe, and the raw storage bytes after the 5th pickle are copied as they
    are. The copy is in memory: such files come from 2017-2019 and are small.
    """
    data = path.read_bytes()
    src, out, count = io.BytesIO(data), io.BytesIO(), 0
    for _ in range(5):  # magic, protocol, sys_info, the object, storage keys
        ops = list(pickletools.genops(src))
        ends = [pos for _op, _arg, pos in ops[1:]] + [src.tell()]
        for (op, arg, pos), end in zip(ops, ends, strict=True):
            if op.name != "INT":
                out.write(data[pos:end])
                continue
            count += 1
            if isinstance(arg, bool):
                out.write(pickle.NEWTRUE if arg else pickle.NEWFALSE)
            elif -(2**31) <= arg < 2**31:
                out.write(pickle.BININT + struct.pack("<i", arg))
            else:
                raw = pickle.encode_long(arg)
                out.write(pickle.LONG1 + bytes([len(raw)]) + raw)
    out.write(data[src.tell() :])
    out.seek(0)
    return out, count


# ---- safetensors ---------------------------------------------------------------------------------------------
def check_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and validate a safetensors header without trusting it; returns the header dict.

    Reads 8 bytes and then at most MAX_HEADER_BYTES, so a hostile length cannot make us allocate much.
    """
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: the file is empty (0 bytes)")
    if size < 8:
        raise UserError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise UserError(
                f"{path}: safetensors header length {n:,} bytes is over the {MAX_HEADER_BYTES:,}-byte limit "
                "(not a safetensors file, or corrupted)"
            )
        if 8 + n > size:
            raise UserError(
                f"{path}: safetensors header length {n:,} bytes runs past the end of the {size:,}-byte file "
                "(truncated, or not a safetensors file)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        spans.append((*_tensor_span(path, name, info, data_size), name))
    spans.sort()
    for (_b1, e1, n1), (b2, _e2, n2) in itertools.pairwise(spans):
        if b2 < e1:
            raise UserError(f"{path}: tensors {n1!r} and {n2!r} overlap in the data section (corrupted file)")
    return header


def _tensor_span(path: Path, name: str, info: Any, data_size: int) -> tuple[int, int]:
    """(begin, end) of one tensor's bytes after checking its dtype, shape and offsets agree."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise UserError(f"{where}: header entry needs dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in SAFETENSORS_DTYPE_BITS:
        raise UserError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise UserError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise UserError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_size:
        raise UserError(
            f"{where}: its data ends at byte {end:,} but the data section has {data_size:,} bytes (truncated file)"
        )
    bits = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype]
    if bits % 8 or end - begin != bits // 8:
        raise UserError(
            f"{where}: {dtype} {shape} needs {bits / 8:g} bytes but its offsets span {end - begin:,}"
        )
    return begin, end


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a validated safetensors file; tied tensors recorded as aliases come back shared."""
    header = check_safetensors_header(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    metadata = dict(header.get("__metadata__", {}))
    if ALIASES_KEY in metadata:
        try:
            aliases = json.loads(metadata[ALIASES_KEY])
            for alias, stored in aliases.items():
                tensors[alias] = tensors[stored]
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: metadata {ALIASES_KEY!r} is damaged ({exc!r})") from None
    return tensors, metadata
