"""The checkpoint format: what a committed checkpoint holds, and how it is verified.

Layout of one checkpoint, `<run>/checkpoints/step-00001200/`:

    model.safetensors   model weights, clean keys (no `module.` / `_orig_mod.`); tied tensors stored once
    .metadata, __R_0.distcp   instead of model.safetensors and optimizer.pt when sharded (launcher.checkpoint.sharded)
    ema.safetensors     the exponential moving average of the weights (only with --ema.decay)
    optimizer.pt        optimizer state dict (torch.save; loads with weights_only=True)
    scaler.pt           fp16 grad-scaler state (only when a scaler is in use)
    rng-00000.pt ...    RNG states of each rank: python, numpy, torch, cuda (tensors and ints only)
    state.json          step, data position, best metric, world size, model/optimizer fingerprint, config
    COMPLETE            written last: size and CRC-32 (per 64 MiB chunk) of every file above

Verifying checks the marker, the file list, every size and checksum, and state.json against its schema.
Checksums are CRC-32 rather than a cryptographic hash: they guard against torn writes, truncation and bit rot,
not against an adversary (loading never unpickles arbitrary objects anyway), and they cost under a third of
sha256 (benchmarks/checkpoint_io.py). Chunks are hashed in threads (zlib releases the GIL).
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launcher.checkpoint.state_dict import strip_prefixes
from launcher.errors import CheckpointError

try:  # zlib-ng computes the very same CRC-32 about five times faster (vectorised); the standard zlib otherwise
    from zlib_ng.zlib_ng import crc32 as _crc32

    CRC32_IMPLEMENTATION = "zlib-ng"
except ImportError:
    from zlib import crc32 as _crc32

    CRC32_IMPLEMENTATION = "zlib"

FORMAT = "launcher-checkpoint/2"
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
TMP_PREFIX = ".tmp-"
SUPERSEDED = "superseded"
CHUNK_BYTES = 64 << 20  # checksum granularity: chunks hash in parallel, and a mismatch names its offset
REQUIRED = ("model.safetensors", "optimizer.pt", "state.json")
# A sharded checkpoint (--parallel.strategy fsdp) holds torch.distributed.checkpoint's files instead of the first two.
REQUIRED_SHARDED = (".metadata", "state.json")
ALLOWED = re.compile(
    r"^(model\.safetensors|ema\.safetensors|optimizer\.pt|scaler\.pt|state\.json|rng-\d{5}\.pt"
    r"|\.metadata|__\d+_\d+\.distcp)$"
)
STATE_FIELDS = {"format", "state", "world_size", "fingerprint", "config"}
FINGERPRINT_FIELDS = ("model", "optimizer", "global_batch", "train_samples")


@dataclass
class TrainState:
    """Where training is: everything besides the tensors that a resume needs. The loop, the evaluation
    bookkeeping and the checkpointer all read and write this one object; state.json holds it field by field."""

    step: int = 0
    """Optimizer steps taken (also the schedule position)."""
    epoch: int = 0
    """Current epoch (0-based)."""
    samples_in_epoch: int = 0
    """Samples of the current epoch already consumed, over all processes."""
    samples_seen: int = 0
    """Samples consumed since the start of training, over all processes."""
    best_value: float | None = None
    """Best value of the key metric so far (None before the first evaluation)."""
    best_step: int | None = None
    """Step at which best_value was reached; rotation never deletes the checkpoint of this step."""
    stale_evals: int = 0
    """Evaluations in a row without an improvement beyond early stopping's min_delta."""
    plateau: dict | None = None
    """The plateau schedule's state (launcher.schedules.Plateau) when the schedule decays on a plateau."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> int:
    """The step of a `step-N` checkpoint directory."""
    match = STEP_DIR.match(path.name)
    assert match is not None
    return int(match.group(1))


def model_fingerprint(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in strip_prefixes(model.state_dict()).items()}


# ---- checksums -----------------------------------------------------------------------------------------------
_local = threading.local()


def hash_threads() -> int:
    # Two threads already halve the time; more would steal cores from data loaders for little gain.
    return max(1, min(4, os.cpu_count() or 1))


def crc_chunk(path: Path, offset: int, length: int) -> str:
    """CRC-32 of `length` bytes at `offset`, read into a per-thread buffer (no mmap: a file that shrinks under
    an mmap kills the process with SIGBUS, and some network file systems do not support it)."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(8 << 20)
    view, crc = memoryview(buf), 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while length > 0:
            n = f.readinto(view[: min(length, len(buf))])
            if not n:
                raise OSError(f"{path} ended early while reading it")
            crc = _crc32(view[:n], crc)
            length -= n
    return f"{crc:08x}"


def submit_digest(pool: ThreadPoolExecutor, path: Path) -> tuple[int, list[Future[str]]]:
    size = path.stat().st_size
    chunks = range(0, size, CHUNK_BYTES)
    return size, [pool.submit(crc_chunk, path, off, min(CHUNK_BYTES, size - off)) for off in chunks]


def hash_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(hash_threads(), thread_name_prefix="ckpt-hash")


# ---- verifying ----------------------------------------------------------------------------------------------
def verify(path: Path) -> dict[str, Any]:
    """Check the marker, the file list, sizes and checksums; return the parsed state.json. Raises CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    try:
        return _verify(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc})") from None


def _verify(path: Path) -> dict[str, Any]:
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: no {MARKER} marker (the save was interrupted)")
    try:
        manifest = json.loads(marker.read_text())
        fmt = manifest["format"]
        if fmt != FORMAT:
            raise CheckpointError(f"{path}: format {fmt!r}, expected {FORMAT!r}")
        files, step, chunk = manifest["files"], manifest["step"], manifest["chunk_bytes"]
        if not isinstance(files, dict) or not isinstance(chunk, int) or chunk <= 0:
            raise TypeError("malformed 'files' or 'chunk_bytes'")
        for name, info in files.items():
            if not (isinstance(info["size"], int) and isinstance(info["crc32"], list)):
                raise TypeError(f"malformed entry for {name!r}")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable {MARKER} marker ({exc})") from None
    match = STEP_DIR.match(path.name)
    if match and int(match.group(1)) != step:
        raise CheckpointError(f"{path}: its {MARKER} marker is for step {step}")

    present = {p.name for p in path.iterdir()} - {MARKER}
    for name in sorted(present | set(files)):
        if not ALLOWED.match(name):
            raise CheckpointError(f"{path}: unknown entry {name!r}")
    required = REQUIRED_SHARDED if ".metadata" in present | set(files) else REQUIRED
    if missing := sorted((set(required) | set(files)) - present):
        raise CheckpointError(f"{path}: missing {missing}")
    if extra := sorted(present - set(files)):
        raise CheckpointError(f"{path}: entries not listed in {MARKER}: {extra}")
    for name, info in sorted(files.items()):
        size = (path / name).stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{path}: {name} is {size} bytes, expected {info['size']} (truncated?)")
        if len(info["crc32"]) != -(-size // chunk):
            raise CheckpointError(f"{path}: {MARKER} lists {len(info['crc32'])} checksums for {name}")
    _check_crc32(path, files, chunk)
    return _check_record(path, step, present)


def _check_crc32(path: Path, files: dict[str, Any], chunk: int) -> None:
    with hash_pool() as pool:
        actual = {
            name: [
                pool.submit(crc_chunk, path / name, off, min(chunk, files[name]["size"] - off))
                for off in range(0, files[name]["size"], chunk)
            ]
            for name in sorted(files)
        }
        for name, futures in actual.items():
            for i, (future, expected) in enumerate(zip(futures, files[name]["crc32"], strict=True)):
                if future.result() != expected:
                    raise CheckpointError(
                        f"{path}: {name} does not match its checksum at bytes {i * chunk}-"
                        f"{min((i + 1) * chunk, files[name]['size'])} (corrupted)"
                    )


def _check_record(path: Path, step: int, present: set[str]) -> dict[str, Any]:
    """state.json, strictly: exactly the known entries, the marker's format and step, an RNG file per rank."""
    try:
        record = json.loads((path / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: state.json is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or set(record) != STATE_FIELDS:
        keys = set(record) if isinstance(record, dict) else set()
        unknown, absent = sorted(keys - STATE_FIELDS), sorted(STATE_FIELDS - keys)
        raise CheckpointError(f"{path}: state.json has unknown entries {unknown} / lacks {absent}")
    if record["format"] != FORMAT:
        raise CheckpointError(f"{path}: state.json format {record['format']!r}, its {MARKER} {FORMAT!r}")
    state_fields = set(TrainState.__dataclass_fields__)
    saved = record["state"] if isinstance(record["state"], dict) else {}
    if set(saved) != state_fields:
        unknown, absent = sorted(set(saved) - state_fields), sorted(state_fields - set(saved))
        raise CheckpointError(f"{path}: state.json 'state' has unknown entries {unknown} / lacks {absent}")
    if problem := _state_problem(record["state"]):
        raise CheckpointError(f"{path}: state.json 'state' is invalid: {problem}")
    if not isinstance(record["config"], dict) or not isinstance(record["fingerprint"], dict):
        raise CheckpointError(f"{path}: state.json 'config' and 'fingerprint' must be JSON objects")
    if saved["step"] != step:
        raise CheckpointError(f"{path}: state.json is for step {saved['step']}, its {MARKER} for step {step}")
    world = record["world_size"]
    if not isinstance(world, int) or world < 1:
        raise CheckpointError(f"{path}: state.json has world_size {world!r}")
    rng = {f"rng-{rank:05d}.pt" for rank in range(world)}
    present_rng = {name for name in present if name.startswith("rng-")}
    if present_rng != rng:
        unknown, absent = sorted(present_rng - rng), sorted(rng - present_rng)
        raise CheckpointError(
            f"{path}: saved by {world} processes, but RNG files {unknown} are extra / {absent} are missing"
        )
    return record


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _state_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with a saved TrainState (types, ranges, consistency), or None. A tampered or damaged
    state.json must be refused here, not surface later as a traceback or as a silent fresh start."""
    for name in ("step", "epoch", "samples_in_epoch", "samples_seen", "stale_evals"):
        if not _is_int(state[name]) or state[name] < 0:
            return f"{name} must be a non-negative integer, got {state[name]!r}"
    best = state["best_value"]
    if best is not None and not (
        isinstance(best, (int, float)) and not isinstance(best, bool) and math.isfinite(best)
    ):
        return f"best_value must be a finite number or null, got {best!r}"
    best_step = state["best_step"]
    if best_step is not None and not (_is_int(best_step) and 0 <= best_step <= state["step"]):
        return f"best_step must be null or a step in [0, {state['step']}], got {best_step!r}"
    if (best is None) != (best_step is None):
        return "best_value and best_step must both be set or both be null"
    if state["samples_in_epoch"] > state["samples_seen"]:
        return f"samples_in_epoch {state['samples_in_epoch']} exceeds samples_seen {state['samples_seen']}"
    if state["plateau"] is not None and not isinstance(state["plateau"], dict):
        return f"plateau must be an object or null, got {state['plateau']!r}"
    return None


def check_compatible(record: dict, fingerprint: dict, path: Path) -> list[str]:
    """Differences between the checkpoint's run and this one that change what training means."""
    saved = record["fingerprint"] if isinstance(record.get("fingerprint"), dict) else {}
    problems = []
    for key in FINGERPRINT_FIELDS:
        if key not in saved:
            problems.append(f"the checkpoint does not record {key}")
    old, new = saved.get("model", {}), fingerprint["model"]
    if "model" in saved and old != new:
        diffs = [
            f"{k}: {old.get(k)} -> {new.get(k)}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        ]
        problems.append(f"model parameters differ ({len(diffs)}): " + "; ".join(diffs[:5]))
    for key in FINGERPRINT_FIELDS[1:]:
        if key in saved and saved[key] != fingerprint[key]:
            problems.append(f"{key} {saved[key]} -> {fingerprint[key]}")
    return problems
