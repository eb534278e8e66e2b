"""Atomic, resumable checkpoints.

Layout of one checkpoint, `<run>/checkpoints/step-00001200/`:

    model.safetensors   model weights, clean keys (no `module.` / `_orig_mod.`)
    optimizer.pt        optimizer state dict (torch.save; loads with weights_only=True)
    scaler.pt           fp16 grad-scaler state (only when a scaler is in use)
    rng-00000.pt ...    RNG states of each rank: python, numpy, torch, cuda (tensors and ints only)
    state.json          step, data position, best metric, world size, model/optimizer fingerprint, config
    COMPLETE            written last: size and sha256 of every file above

Commit protocol: every rank writes into `checkpoints/.tmp-step-00001200/` and fsyncs its files; the ranks agree
that all writes succeeded; rank 0 writes COMPLETE, fsyncs the directory, renames it to `step-00001200`, fsyncs
`checkpoints/`, then replaces the `latest` pointer and only then deletes old checkpoints (never the best one).
A crash at any point leaves either the old set of checkpoints or the old set plus the new one, and a leftover
`.tmp-*` directory that the next save removes. Loading checks the marker, the file list and every hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from launcher.errors import CheckpointError, UserError
from launcher.state_dict import load_into, read_weights, strip_prefixes

log = logging.getLogger("launcher")

FORMAT = "launcher-checkpoint/1"
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d{8,})$")


@dataclass
class TrainState:
    """Where training is: everything besides the tensors that a resume needs."""

    step: int = 0
    """Optimizer steps taken (also the schedule position)."""
    epoch: int = 0
    """Current epoch (0-based)."""
    samples_in_epoch: int = 0
    """Samples of the current epoch already consumed, over all processes."""
    samples_seen: int = 0
    """Samples consumed since the start of training, over all processes."""
    best_value: float | None = None
    best_step: int | None = None


STATE_FIELDS = {"format", "state", "world_size", "fingerprint", "config"}


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def rng_state() -> dict[str, Any]:
    """This process's RNG states in a form torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
            "kind": str(kind),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_fingerprint(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in strip_prefixes(model.state_dict()).items()}


class Checkpointer:
    """Saves and finds checkpoints of one run directory. All ranks call `save`; rank 0 commits."""

    def __init__(self, run_dir: Path, accelerator: Any, keep_last: int, tolerate_failures: bool) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep_last = keep_last
        self.tolerate_failures = tolerate_failures

    # ---- saving ------------------------------------------------------------------------------------------------
    def save(
        self, model: torch.nn.Module, optimizer: Any, scaler: Any, state: TrainState, meta: dict
    ) -> bool:
        """Write and commit a checkpoint of `state`. Returns False if it failed and failures are tolerated."""
        acc = self.accelerator
        name = step_dir_name(state.step)
        final, tmp = self.dir / name, self.dir / f".tmp-{name}"
        # Three phases, each closed by an all-reduce of "did anything fail here": the reduction is also the
        # barrier, so no rank runs ahead into a collective that another rank never reaches.
        phases = (
            lambda: self._prepare(tmp) if acc.is_main_process else None,
            lambda: self._write(tmp, model, optimizer, scaler, state, meta),
            lambda: self._commit(tmp, final, state) if acc.is_main_process else None,
        )
        for phase in phases:
            error = None
            try:
                phase()
            except Exception as exc:  # disk full, permissions, I/O errors: torch, safetensors and os differ
                error = exc
            if self._any_rank_failed(error is not None):
                return self._failed(error, tmp, name)
        return True

    def _prepare(self, tmp: Path) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        tmp.mkdir()

    def _write(
        self, tmp: Path, model: torch.nn.Module, optimizer: Any, scaler: Any, state: TrainState, meta: dict
    ) -> None:
        acc = self.accelerator
        files = [tmp / f"rng-{acc.process_index:05d}.pt"]
        torch.save(rng_state(), files[0])
        if acc.is_main_process:
            weights = strip_prefixes(acc.unwrap_model(model, keep_torch_compile=False).state_dict())
            save_file(
                {k: v.detach().contiguous() for k, v in weights.items()},
                tmp / "model.safetensors",
                metadata={"format": "pt", "step": str(state.step)},
            )
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            files += [tmp / "model.safetensors", tmp / "optimizer.pt"]
            if scaler is not None:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
                files.append(tmp / "scaler.pt")
            record = {"format": FORMAT, "state": asdict(state), "world_size": acc.num_processes, **meta}
            (tmp / "state.json").write_text(json.dumps(record, indent=2) + "\n")
            files.append(tmp / "state.json")
        for f in files:
            _fsync(f)

    def _any_rank_failed(self, failed: bool) -> bool:
        flag = torch.tensor([int(failed)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item())

    def _commit(self, tmp: Path, final: Path, state: TrainState) -> None:
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {
            "format": FORMAT,
            "step": state.step,
            "files": {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files},
        }
        with open(tmp / MARKER, "w") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        if final.exists():  # a checkpoint of this very step exists (e.g. re-saved after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(self.dir)
        _write_json_atomic(self.dir / "latest", {"checkpoint": final.name, "step": state.step})
        self._rotate(state.best_step)

    def _failed(self, error: Exception | None, tmp: Path, name: str) -> bool:
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = f"{type(error).__name__}: {error}" if error else "another process failed to write its part"
        message = (
            f"could not save checkpoint {name} in {self.dir} ({reason}). The previous checkpoints are intact and "
            "`latest` still points to the last good one. Free disk space or fix the directory's permissions"
        )
        if self.tolerate_failures:
            log.warning(
                "WARNING: %s; training continues because --checkpoint.tolerate-save-failures is set", message
            )
            return False
        raise CheckpointError(message + "; then rerun the same command to resume")

    def _remove_leftovers(self) -> None:
        for p in self.dir.glob(".tmp-*"):
            log.warning("removing %s, left over from an interrupted save", p)
            shutil.rmtree(p, ignore_errors=True)

    def _rotate(self, best_step: int | None) -> None:
        committed = self.list()
        keep = {p for p in committed[-self.keep_last :]}
        keep |= {p for p in committed if best_step is not None and _step_of(p) == best_step}
        for p in committed:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # ---- finding -----------------------------------------------------------------------------------------------
    def list(self) -> list[Path]:
        """Committed checkpoint directories (not verified), oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted((p for p in self.dir.iterdir() if STEP_DIR.match(p.name) and p.is_dir()), key=_step_of)

    def latest_valid(self) -> Path | None:
        """The newest checkpoint that verifies; each one skipped is named in a warning."""
        for path in reversed(self.list()):
            try:
                verify(path)
                return path
            except CheckpointError as exc:
                log.warning("WARNING: skipping checkpoint %s: %s", path, exc)
        return None


def _step_of(path: Path) -> int:
    match = STEP_DIR.match(path.name)
    assert match is not None
    return int(match.group(1))


def verify(path: Path) -> dict[str, Any]:
    """Check the marker, the file list, sizes and hashes; return the parsed state.json. Raises CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: no {MARKER} marker (the save was interrupted)")
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
        if manifest["format"] != FORMAT:
            raise CheckpointError(f"{path}: format {manifest['format']!r}, expected {FORMAT!r}")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable {MARKER} marker ({exc})") from None
    present = {p.name for p in path.iterdir()} - {MARKER}
    required = {"model.safetensors", "optimizer.pt", "state.json", "rng-00000.pt"}
    allowed = re.compile(r"^(model\.safetensors|optimizer\.pt|scaler\.pt|state\.json|rng-\d{5}\.pt)$")
    for name in sorted(present | set(files)):
        if not allowed.match(name):
            raise CheckpointError(f"{path}: unknown entry {name!r}")
    if missing := sorted((required | set(files)) - present):
        raise CheckpointError(f"{path}: missing {missing}")
    if extra := sorted(present - set(files)):
        raise CheckpointError(f"{path}: entries not listed in {MARKER}: {extra}")
    if missing := sorted(required - set(files)):
        raise CheckpointError(f"{path}: {MARKER} does not list {missing}")
    for name, info in files.items():
        size = (path / name).stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{path}: {name} is {size} bytes, expected {info['size']} (truncated?)")
        if _sha256(path / name) != info["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its sha256 (corrupted)")
    record = json.loads((path / "state.json").read_text())
    if set(record) != STATE_FIELDS:
        unknown, absent = sorted(set(record) - STATE_FIELDS), sorted(STATE_FIELDS - set(record))
        raise CheckpointError(f"{path}: state.json has unknown entries {unknown} / lacks {absent}")
    state_fields = set(TrainState.__dataclass_fields__)
    if set(record["state"]) != state_fields:
        unknown, absent = (
            sorted(set(record["state"]) - state_fields),
            sorted(state_fields - set(record["state"])),
        )
        raise CheckpointError(f"{path}: state.json 'state' has unknown entries {unknown} / lacks {absent}")
    return record


def check_compatible(record: dict, fingerprint: dict, path: Path) -> list[str]:
    """Differences between the checkpoint's run and this one that change what training means."""
    saved = record["fingerprint"]
    problems = []
    if saved["model"] != fingerprint["model"]:
        old, new = saved["model"], fingerprint["model"]
        diffs = [
            f"{k}: {old.get(k)} -> {new.get(k)}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        ]
        problems.append(f"model parameters differ ({len(diffs)}): " + "; ".join(diffs[:5]))
    for key in ("optimizer", "global_batch", "train_samples"):
        if saved[key] != fingerprint[key]:
            problems.append(f"{key} {saved[key]} -> {fingerprint[key]}")
    return problems


def load(path: Path, model: torch.nn.Module, optimizer: Any, scaler: Any, accelerator: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scaler and this rank's RNG from a verified checkpoint; return state.json."""
    record = verify(path)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    load_into(unwrapped, read_weights(path / "model.safetensors"), source=str(path / "model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scaler_file = path / "scaler.pt"
    if scaler is not None and scaler_file.is_file():
        scaler.load_state_dict(torch.load(scaler_file, map_location="cpu", weights_only=True))
    elif scaler is not None:
        log.warning(
            "WARNING: %s has no grad-scaler state (saved without fp16); the scaler starts fresh", path
        )
    rng_file = path / f"rng-{accelerator.process_index:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    else:
        log.warning(
            "WARNING: %s has no RNG state for rank %d (saved by %d processes); its RNG is seeded afresh",
            path,
            accelerator.process_index,
            record["world_size"],
        )
    return record


def resolve_resume(resume: str, checkpointer: Checkpointer) -> Path | None:
    """`auto`: newest valid checkpoint or None; `none`: None; otherwise the given checkpoint, which must verify."""
    if resume == "none":
        return None
    if resume == "auto":
        return checkpointer.latest_valid()
    path = Path(resume)
    if path.is_dir() and (path / "checkpoints").is_dir():  # a run directory: its newest valid checkpoint
        found = Checkpointer(path, checkpointer.accelerator, 1, False).latest_valid()
        if found is None:
            raise UserError(f"--resume {resume}: that run directory holds no valid checkpoint")
        return found
    if path.is_file() and path.name == "latest":
        path = path.parent / json.loads(path.read_text())["checkpoint"]
    verify(path)  # an explicit checkpoint that does not verify is an error, never a silent fresh start
    return path
