"""Reading checkpoint files of any origin without running code from them.

A torch.save file is a pickle, and unpickling can call any function the file names. So every torch.save file is
read with `torch.load(..., weights_only=True)`, passed explicitly: torch only lets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
turn safety off when the caller did not pass `weights_only`. The only way to run a file's code is
`allow_unsafe=True` (`launcher convert-ckpt --unsafe-load-pickled-code`), which the user has to ask for by name.

On top of torch's own allowlist this module accepts:

- a few globals that construct plain values and that real checkpoints are full of: numpy scalars of plain numeric
  dtypes (under their numpy 1 and numpy 2 module names) and `argparse.Namespace`. numpy's own dtype constructor is
  not allowlisted: its __setstate__ takes fields and subarrays from the file, and a dtype with a forged object field
  makes numpy use bytes from the file as a pointer. A stand-in checks each dtype first (see `_NumpyDtype`);
- Python-2-era legacy files, whose pickles hold the text `INT` opcode that the weights-only unpickler does not
  read. The opcodes are rewritten to their binary twins (same values) and the result goes through the same
  weights-only unpickler, so this needs no trust either.

A torch.save zip's directory is checked before torch reads it (`check_zip_sizes`): torch inflates each record
whole, so a small file that inflates to gigabytes would otherwise cost that much memory.

A safetensors header is validated here (size, counts, JSON, dtypes, offsets inside the file and not overlapping)
before the safetensors library sees the file, so a hostile or truncated file costs one bounded read and gives one
line.

A file that would call a known-dangerous function (`posix.system`, `builtins.eval`, ...) is called likely
malicious, and the error does not suggest `--unsafe-load-pickled-code`.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import io
import itertools
import json
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

from launcher.checkpoint.state_dict import ALIASES_KEY, tie
from launcher.errors import UserError, listing

# The safetensors library refuses headers over 100 MB; so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000
# Tensors one safetensors file may hold. Generous: the largest published models have on the order of 10^5 tensors
# in all (a 671B mixture of experts with a scale beside each FP8 weight) and spread them over dozens of shard
# files, so a single file past 200k is crafted. Parsing and validating costs ~2 kB and ~10 us per tensor, and
# loading and converting far more, so the cap is what bounds the work a header can ask for (~2 s to check 200k
# on a busy 2-core machine); it is counted before the JSON is parsed.
MAX_SAFETENSORS_TENSORS = 200_000
# JSON values (commas outside strings) a header may hold: a tensor entry has 4 plus one per dimension past the
# first, so 16 per tensor of the cap, plus room for __metadata__ entries. Bounds the parse of a small header that
# is one huge list or object.
MAX_HEADER_VALUES = 16 * MAX_SAFETENSORS_TENSORS + 65_536
# How much the compressed records of a torch.save zip may inflate, in all. torch.save stores every record
# uncompressed (1x); a checkpoint recompressed by hand (zip -9) inflates its pickle a few times. Deflate reaches
# ~1000x on repetitive bytes, which is how a 1 MB file inflates to 1 GiB.
MAX_ZIP_INFLATION = 16
# Extra inflation allowed on top, so that a few tiny compressed records (a version number) never count as a bomb.
ZIP_INFLATION_SLACK = 1 << 20
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
# Modules whose functions run commands, code or network and file I/O when called. A checkpoint never needs them;
# exploit pickles do (os.system is pickled as posix.system on Linux and nt.system on Windows). `__builtin__` and
# `commands` are their Python 2 names.
DANGEROUS_MODULES = frozenset(
    {
        "os", "posix", "nt", "subprocess", "_posixsubprocess", "shutil", "socket", "sys", "importlib", "imp",
        "pty", "runpy", "ctypes", "_ctypes", "multiprocessing", "asyncio", "code", "codeop", "pickle", "_pickle",
        "marshal", "webbrowser", "pdb", "bdb", "timeit", "profile", "cProfile", "trace", "commands", "popen2",
    }
)  # fmt: skip
# Single functions of otherwise harmless modules that do the same: run code, import modules or reach any attribute.
DANGEROUS_GLOBALS = frozenset(
    {
        *(f"{module}.{name}" for module in ("builtins", "__builtin__") for name in (
            "eval", "exec", "execfile", "compile", "__import__", "getattr", "setattr", "delattr", "open",
            "input", "breakpoint", "globals", "locals", "vars", "apply", "reload", "file",
        )),
        "types.FunctionType", "types.LambdaType", "types.CodeType",
        "operator.attrgetter", "operator.methodcaller", "_operator.attrgetter", "_operator.methodcaller",
        "io.open", "_io.open", "io.FileIO", "_io.FileIO",
    }
)  # fmt: skip
# The text that starts every refusal of a numpy dtype, so that the load error can be recognised and explained.
DTYPE_REFUSED = "refused numpy dtype"
# numpy's dtype codes for plain numbers as its pickles spell them ("f8", "c16", "b1"): kind letter, then bytes.
PLAIN_NUMPY_DTYPE = re.compile(r"[biufc][0-9]{1,2}")


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
    if fmt == "torch zip":
        check_zip_sizes(path)
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
    made = _NumpyDtype.made
    with torch.serialization.safe_globals(safe_globals()):
        obj = torch.load(f, map_location="cpu", weights_only=True)
    # A dtype pickled on its own (not inside a scalar) is still a stand-in: swap in the real numpy dtype.
    return _real_dtypes(obj) if _NumpyDtype.made != made else obj


def safe_globals() -> list[Any]:
    """Globals that only build plain values, allowlisted for weights-only loading.

    A numpy scalar is pickled as `scalar(dtype, raw bytes)`, the dtype as `numpy.dtype(code, align, copy)` followed
    by a BUILD with its state. Both names are mapped to stand-ins that accept plain numeric dtypes only and build
    the numpy objects themselves (`_NumpyDtype`, `_numpy_scalar`). numpy 2 moved `scalar` from `numpy.core` to
    `numpy._core`, and a file names whichever numpy wrote it, so both names are mapped.
    `argparse.Namespace` is rebuilt as an empty object whose __dict__ is then filled with already-unpickled values.
    """
    out: list[Any] = [argparse.Namespace]
    try:
        import numpy  # noqa: F401
    except ImportError:  # no numpy: files holding numpy values fail with a message naming the global
        return out
    out += [
        (_numpy_scalar, "numpy.core.multiarray.scalar"),
        (_numpy_scalar, "numpy._core.multiarray.scalar"),
        (_NumpyDtype, "numpy.dtype"),
    ]
    return out


class _NumpyDtype:
    """Stands in for `numpy.dtype` while unpickling, so that nothing numpy builds ever sees a state from the file.

    The weights-only unpickler calls an allowlisted class with the pickled arguments, and then, for BUILD, the
    instance's __setstate__ with the pickled state. numpy's own dtype.__setstate__ accepts any fields, subarray and
    flags on a fresh dtype: a void or float64 dtype given a field of Python objects makes numpy read 8 bytes of the
    file as a pointer (inspect-ckpt segfaulted), and one given a field or subarray past its 8 bytes reads beyond
    the scalar's memory. So the code and the state are
    checked here, and only a fresh `numpy.dtype(code)` of a plain numeric kind, in the pickled byte order, is built.
    """

    made = 0  # instances created, so that a load without numpy dtypes skips the search for stand-ins

    __slots__ = ("byteorder", "code")

    def __new__(cls, code: Any = None, align: Any = False, copy: Any = False) -> _NumpyDtype:
        # Called for REDUCE as numpy.dtype("f8", False, True), and as __new__ for NEWOBJ, with the file's arguments.
        if isinstance(code, bytes):  # Python 2 pickles spell it as a byte string
            code = code.decode("latin-1")
        if not isinstance(code, str) or not PLAIN_NUMPY_DTYPE.fullmatch(code):
            raise pickle.UnpicklingError(f"{DTYPE_REFUSED} {_describe_code(code)}")
        self = super().__new__(cls)
        self.code, self.byteorder = code, "="
        _NumpyDtype.made += 1
        self.build()  # an unknown size ("f3") fails here, before BUILD
        return self

    def __setstate__(self, state: Any) -> None:
        """Accept exactly what numpy writes for a plain numeric dtype: (3, byte order, None, None, None, -1, -1,
        flags), or version 4 with metadata after it. Fields, a subarray or an item size are refused unbuilt."""
        plain = (
            isinstance(state, tuple)
            and len(state) in (8, 9)
            and state[0] in (3, 4)
            and state[1] in ("<", ">", "|", "=", b"<", b">", b"|", b"=")
            and state[2:5] == (None, None, None)
            and state[5:7] == (-1, -1)
            and type(state[7]) is int
        )
        if not plain:
            raise pickle.UnpicklingError(
                f"{DTYPE_REFUSED} {self.code!r} rebuilt with {_describe_state(state)}"
            )
        order = state[1].decode() if isinstance(state[1], bytes) else state[1]
        self.byteorder = order if order in "<>" else "="

    def build(self) -> Any:
        """The real numpy dtype, built from the checked code and byte order only."""
        import numpy as np

        try:
            dtype = np.dtype(self.code).newbyteorder(self.byteorder)
        except TypeError:
            raise pickle.UnpicklingError(
                f"{DTYPE_REFUSED} {self.code!r} (numpy knows no such dtype)"
            ) from None
        if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
            raise pickle.UnpicklingError(f"{DTYPE_REFUSED} {self.code!r} (not a plain number)")
        return dtype


def _describe_code(code: Any) -> str:
    """A refused dtype code in words (never the repr of a huge value): what it is, and why it matters."""
    if not isinstance(code, str):
        return f"given as a {type(code).__name__}, not a type code (crafted or damaged)"
    if code[:1] in ("O", "V"):
        kind = "of Python objects" if code[0] == "O" else "structured (void)"
        # Checkpoints hold numbers; these kinds are how a crafted file makes numpy use its bytes as pointers.
        return (
            f"{code[:16]!r} ({kind}): no checkpoint needs one, and a crafted one makes numpy read memory the file "
            "chooses, so the file is likely malicious"
        )
    return f"{code[:16]!r}: only plain numbers (bool, int, uint, float, complex) are read"


def _describe_state(state: Any) -> str:
    if isinstance(state, tuple) and len(state) >= 5 and (state[2] is not None or state[4] is not None):
        parts = "fields" if state[4] is not None else "a subarray"
        return (
            f"{parts}, which numpy never writes for it: a forged dtype makes numpy read memory the file chooses, "
            "so the file is likely malicious"
        )
    size = f" of {len(state)}" if isinstance(state, (tuple, list, dict)) else ""
    return f"a {type(state).__name__}{size} numpy does not write as a dtype state (crafted or damaged)"


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """Stands in for `numpy.core.multiarray.scalar(dtype, raw bytes)`, for a checked dtype and bytes of its size."""
    if not isinstance(dtype, _NumpyDtype):
        raise pickle.UnpicklingError(
            f"{DTYPE_REFUSED}: a numpy scalar of {type(dtype).__name__}, not of a dtype"
        )
    real = dtype.build()
    if isinstance(data, str):  # Python 2 pickles and protocol 0/1 carry the bytes as a latin-1 string
        data = data.encode("latin-1")
    if not isinstance(data, bytes) or len(data) != real.itemsize:
        size = len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__
        raise pickle.UnpicklingError(
            f"{DTYPE_REFUSED}: a numpy {real} scalar needs {real.itemsize} bytes, got {size}"
        )
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return core.multiarray.scalar(real, data)


def _real_dtypes(obj: Any, depth: int = 0, done: dict[int, Any] | None = None) -> Any:
    """`obj` with each `_NumpyDtype` in it, in the containers unpickling can make, replaced by its numpy dtype.

    Each container is visited once (`done`, by id): a pickle can share one list many times over, and visiting
    every path through such a graph would take exponential time.
    """
    if isinstance(obj, _NumpyDtype):
        return obj.build()
    if depth > 100 or not isinstance(obj, (dict, list, tuple, set, frozenset, argparse.Namespace)):
        return obj  # deeper than any checkpoint nests, or a leaf (a tensor, a number, a string)
    done = {} if done is None else done
    if id(obj) in done:
        return done[id(obj)]
    done[id(obj)] = obj
    if isinstance(obj, dict):  # OrderedDict too; changed in place so that shared references stay shared
        items = [(_real_dtypes(k, depth + 1, done), _real_dtypes(v, depth + 1, done)) for k, v in obj.items()]
        obj.clear()
        obj.update(items)
    elif isinstance(obj, list):
        obj[:] = [_real_dtypes(v, depth + 1, done) for v in obj]
    elif isinstance(obj, argparse.Namespace):
        _real_dtypes(vars(obj), depth + 1, done)
    elif type(obj) in (tuple, set, frozenset):
        done[id(obj)] = type(obj)(_real_dtypes(v, depth + 1, done) for v in obj)
    return done[id(obj)]


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
    dangerous = [g for g in needed if is_dangerous_global(g)]
    # No checkpoint needs these, so offering --unsafe-load-pickled-code would only help an attack along.
    if dangerous:
        return (
            f"{path}: likely malicious: its pickle would call {listing(dangerous, 4)}, which runs commands or code "
            "rather than rebuilding data, and no checkpoint needs that. It was not loaded; do not load it with "
            "torch.load either, and get the weights from a source you trust"
        )
    if DTYPE_REFUSED in reason:
        if "likely malicious" in reason:
            return f"{path}: cannot be read safely: {reason}. It was not loaded"
        return (
            f"{path}: cannot be read safely: {reason}. If you trust the file: launcher convert-ckpt {path} "
            "--unsafe-load-pickled-code"
        )
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
            f"{path}: holds {kind}; reading it would run code from the file to build {listing(needed, 4)}. "
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


def is_dangerous_global(name: str) -> bool:
    """Whether a pickle global (`module.name`) runs commands or code: os.system, builtins.eval, ..."""
    return name in DANGEROUS_GLOBALS or name.split(".", 1)[0] in DANGEROUS_MODULES


def _load_unsafe(path: Path, fmt: str, needed: list[str]) -> Loaded:
    main = [g for g in needed if g.startswith("__main__.")]
    if main:  # the unpickler would look the class up in *our* __main__: refuse before running anything
        raise UserError(_main_message(path, main))
    # Printed, not logged, and before unpickling: the user must see it even if what follows goes wrong.
    print(
        f"WARNING: --unsafe-load-pickled-code: unpickling {path} with weights_only=False, which runs any code "
        f"the file contains (it needs {listing(needed, 4) or 'nothing beyond the safe loader'})",
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
        check_zip_sizes(path)
        out = []
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                # A diagnostic is not worth inflating a huge member for; zipfile stops at the declared size, and
                # the read limit stops it at ours.
                if info.filename.endswith("/data.pkl") or info.filename == "data.pkl":
                    with z.open(info) as f:
                        data = f.read(MAX_HEADER_BYTES + 1)
                    if len(data) <= MAX_HEADER_BYTES:
                        out.append(data)
        return out
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


def check_zip_sizes(path: Path) -> None:
    """Refuse a zip whose directory promises more data than the file can honestly inflate to (a zip bomb).

    torch's reader allocates each record at its declared size and inflates it whole (a tensor's storage too:
    its size is compared with the tensor's only afterwards), so the declared sizes are checked here, before
    anything is read: a stored record holds exactly its declared bytes, the compressed records inflate at most
    MAX_ZIP_INFLATION times in all, and the compressed sizes fit in the file (records that overlap reuse the same
    bytes many times). Every reader then stops at the declared size: torch's miniz and zipfile both do.
    """
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(f"{path}: a damaged zip file ({exc})") from None
    where = "a zip bomb, or a damaged file; torch.save never compresses"
    packed = sum(i.compress_size for i in infos)
    if packed > size:
        raise UserError(
            f"{path}: its zip directory claims {packed:,} bytes of compressed data in a {size:,}-byte file "
            f"(entries that overlap or run past the end: {where})"
        )
    for info in infos:
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise UserError(
                f"{path}: zip entry {info.filename!r} is stored uncompressed in {info.compress_size:,} bytes but "
                f"claims {info.file_size:,} ({where})"
            )
    squeezed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED]
    inflated = sum(i.file_size for i in squeezed)
    compressed = sum(i.compress_size for i in squeezed)
    if inflated > MAX_ZIP_INFLATION * compressed + ZIP_INFLATION_SLACK:
        worst = max(squeezed, key=lambda i: i.file_size / max(i.compress_size, 1))
        raise UserError(
            f"{path}: its compressed zip entries inflate to {inflated:,} bytes from {compressed:,} "
            f"({worst.filename!r} {worst.file_size / max(worst.compress_size, 1):,.0f}x; more than "
            f"{MAX_ZIP_INFLATION}x is {where})"
        )


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

    Reads 8 bytes and then at most MAX_HEADER_BYTES, so a hostile length cannot make us allocate much; counts the
    header's tensors and values before parsing it (`_count_header`), so that the parse and the checks after it
    are bounded too.
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
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    del raw
    _count_header(path, text)
    try:
        header = json.loads(text)
    except RecursionError:  # the C parser gives up after ~1000 levels; a header has 3
        raise UserError(
            f"{path}: safetensors header nests deeper than a header can (it has 3 levels: the header, a tensor "
            "entry, its shape); crafted or corrupted"
        ) from None
    except ValueError as exc:  # JSONDecodeError, or an integer over Python's 4300-digit limit
        raise UserError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserError(f"{path}: safetensors __metadata__ must map strings to strings")
    if len(header) - ("__metadata__" in header) > MAX_SAFETENSORS_TENSORS:
        raise UserError(_too_many_tensors(path))
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


# A JSON string, escapes included: what `_count_header` removes before it counts brackets and commas.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def _count_header(path: Path, text: str) -> None:
    """Refuse a header with more tensors or values than the caps allow, before json.loads builds any of them.

    Every tensor entry is a JSON object, and every value after the first of a list or object follows a comma;
    counted outside strings, `{` bounds the tensors (one object is the header, one may be __metadata__) and `,`
    the values. Parsing 400k tiny entries took seconds and a gigabyte; counting takes one pass. The counts of
    the raw text include strings and so are upper bounds: only when they are over the caps are the strings
    removed (a second pass) to count exactly, so a name or metadata full of braces is never refused for them.
    """
    if text.count("{") - 2 <= MAX_SAFETENSORS_TENSORS and text.count(",") <= MAX_HEADER_VALUES:
        return
    bare = _JSON_STRING.sub("", text)
    if bare.count("{") - 2 > MAX_SAFETENSORS_TENSORS:
        raise UserError(_too_many_tensors(path))
    if (values := bare.count(",")) > MAX_HEADER_VALUES:
        raise UserError(
            f"{path}: safetensors header holds more values than a header of {MAX_SAFETENSORS_TENSORS:,} tensors "
            f"can need ({values:,} > {MAX_HEADER_VALUES:,}); crafted or corrupted"
        )


def _too_many_tensors(path: Path) -> str:
    return (
        f"{path}: safetensors header lists more than {MAX_SAFETENSORS_TENSORS:,} tensors, the most launcher "
        "reads from one file (real models spread theirs over shard files); crafted or corrupted"
    )


def _tensor_span(path: Path, name: str, info: Any, data_size: int) -> tuple[int, int]:
    """(begin, end) of one tensor's bytes after checking its dtype, shape and offsets agree.

    Types are checked exactly (`type(x) is int`: JSON `true` is not a dimension) and dimensions and offsets fit
    in 64 bits, as the format says, so that no value from the file can make a check itself slow.
    """
    if type(info) is not dict or not ("dtype" in info and "shape" in info and "data_offsets" in info):
        raise UserError(f"{path}: tensor {name!r}: header entry needs dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if type(dtype) is not str or dtype not in SAFETENSORS_DTYPE_BITS:
        raise UserError(f"{path}: tensor {name!r}: unknown dtype {_brief(dtype)}")
    if type(shape) is not list or not all(type(d) is int and 0 <= d < 2**64 for d in shape):
        raise UserError(
            f"{path}: tensor {name!r}: shape {_brief(shape)} is not a list of non-negative integers"
        )
    if (
        type(offsets) is not list
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] < 2**64
    ):
        raise UserError(
            f"{path}: tensor {name!r}: data_offsets {_brief(offsets)} is not [begin, end] with "
            "0 <= begin <= end"
        )
    begin, end = offsets
    if end > data_size:
        raise UserError(
            f"{path}: tensor {name!r}: its data ends at byte {end:,} but the data section has {data_size:,} "
            "bytes (truncated file)"
        )
    numel = 0 if 0 in shape else 1
    for d in shape if numel else ():
        numel *= d
        if numel > 2**128:  # more than any file holds: stop before the product of many dimensions gets slow
            break
    bits = numel * SAFETENSORS_DTYPE_BITS[dtype]
    if bits % 8 or end - begin != bits // 8:
        raise UserError(
            f"{path}: tensor {name!r}: {dtype} {_brief(shape)} needs {bits / 8:g} bytes but its offsets "
            f"span {end - begin:,}"
        )
    return begin, end


def _brief(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: a hostile header's values can be megabytes long."""
    if isinstance(value, list) and len(value) > limit:
        value = value[:limit]
    try:
        text = repr(value)
    except RecursionError:  # nested nearly as deep as the JSON parser allows
        return f"(a {type(value).__name__} nested too deep to show)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a validated safetensors file; tied tensors recorded as aliases come back shared."""
    header = check_safetensors_header(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    metadata = dict(header.get("__metadata__", {}))
    try:
        tie(tensors, metadata)
    # ValueError: not JSON; RecursionError: nested past the parser's limit; the rest: not {alias: key}.
    except (ValueError, RecursionError, AttributeError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: metadata {ALIASES_KEY!r} is damaged ({_brief(exc, 160)})") from None
    return tensors, metadata
