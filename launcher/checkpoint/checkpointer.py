"""The checkpointer: saving (atomically, optionally in the background), finding and loading checkpoints.

What a checkpoint holds and how it is verified: `launcher.checkpoint.format`.

Commit protocol: every rank writes into `checkpoints/.tmp-step-00001200/` and fsyncs its files; the ranks agree
that all writes succeeded; rank 0 writes COMPLETE, fsyncs the directory, renames it to `step-00001200`, fsyncs
`checkpoints/`, then replaces the `latest` pointer and only then deletes old checkpoints (never the best one).
A crash at any point leaves either the old set of checkpoints or the old set plus the new one, and leftover
`.tmp-*` entries that the next save removes. Checkpoints of the same or a later step than the one being committed
belong to an abandoned run of the same directory (resumed from an older checkpoint, or started with --resume
none): they are moved into `superseded/`, never deleted, so that `--resume auto` cannot pick them.

Each file is hashed (while still in the page cache) and fsynced in other threads while the next one is written.
With `async_save`, `save` copies the tensors into reused host buffers and returns; a background thread writes
and commits. `wait()` (called by `save` itself, and by the loop before it exits) reports the outcome.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import launcher.checkpoint.sharded as sharded
from launcher.checkpoint.format import (
    CHUNK_BYTES,
    FORMAT,
    MARKER,
    STEP_DIR,
    SUPERSEDED,
    TMP_PREFIX,
    TrainState,
    hash_pool,
    step_dir_name,
    step_of,
    submit_digest,
    verify,
)
from launcher.checkpoint.state_dict import load_into, strip_prefixes, untie
from launcher.checkpoint.weights import read_own, save_safetensors
from launcher.errors import CheckpointError, UserError
from launcher.files import fsync, write_json_atomic
from launcher.ranks import any_rank

log = logging.getLogger("launcher")


# ---- fault injection (tests) ---------------------------------------------------------------------------------
# Where a save can be told to stop (see pause_point), in the order a save reaches them.
PAUSE_POINTS = (
    "tmp-created",  # rank 0: the empty `.tmp-step-N/` exists
    "background",  # async_save: first thing in the background thread; nothing of this save is written yet
    "written",  # each rank, after each of its files is written (before its fsync); `written:FILE` for one
    "before-marker",  # rank 0: every file written, fsynced and checksummed; no COMPLETE yet
    "before-rename",  # rank 0: COMPLETE written and fsynced, older ones superseded; not yet renamed
    "before-latest",  # rank 0: renamed (committed) and `checkpoints/` fsynced; `latest` not yet replaced
    "before-rotate",  # rank 0: `latest` replaced; old checkpoints not yet deleted
)


def _pause_spec(spec: str | None) -> tuple[str, str | None, int | None] | None:
    """`POINT[:FILE][@STEP]` -> (point, file, step); None when unset. A typo raises at import, so that a test
    waiting for the marker fails at once rather than at its timeout."""
    if not spec:
        return None
    rest, _, step = spec.partition("@")
    point, _, file = rest.partition(":")
    if point not in PAUSE_POINTS or (file and point != "written") or (step and not step.isdigit()):
        raise ValueError(
            f"LAUNCHER_TEST_PAUSE_AT={spec!r}: expected POINT[:FILE][@STEP], POINT one of {PAUSE_POINTS}"
        )
    return point, file or None, int(step) if step else None


# Read once, at import: unset (always, outside the tests), every pause_point call returns at its first comparison.
_PAUSE_AT = _pause_spec(os.environ.get("LAUNCHER_TEST_PAUSE_AT"))
# The marker's name in the run directory, unless LAUNCHER_TEST_PAUSE_MARKER names another file.
PAUSE_MARKER = "checkpoint-paused.json"


def pause_point(point: str, step: int, checkpoints: Path, file: str | None = None) -> None:
    """Fault injection for tests: stop this save at a named point of the commit protocol, so that a test can
    SIGKILL the process exactly there instead of polling the file system for a moment that a fast disk (a tmpfs
    saves in milliseconds) may never show it.

    `LAUNCHER_TEST_PAUSE_AT=POINT[:FILE][@STEP]` arms it: POINT is one of PAUSE_POINTS (`tmp-created`,
    `background`, `written`, `before-marker`, `before-rename`, `before-latest`, `before-rotate`); `written:FILE`
    stops only after that file (`optimizer.pt`, `model.safetensors`, `rng-00000.pt`, ...); `@STEP` only in the
    save of that step (otherwise the first save that gets there). The process that reaches the point (with
    several ranks, each one that does) writes a JSON marker, {"point", "file", "step", "pid", "thread"}, atomically
    to `LAUNCHER_TEST_PAUSE_MARKER` (default: `checkpoint-paused.json` in the run directory, beside
    `checkpoints/`), and then sleeps until it is killed; with async_save that is the background thread, and the
    training loop goes on until its next save waits for it. The variable is read once, when this module is
    imported; unset, this function returns at its first comparison."""
    if _PAUSE_AT is None:
        return
    want_point, want_file, want_step = _PAUSE_AT
    if point != want_point or want_file not in (None, file) or want_step not in (None, step):
        return
    marker = Path(os.environ.get("LAUNCHER_TEST_PAUSE_MARKER") or checkpoints.parent / PAUSE_MARKER)
    thread = threading.current_thread().name
    info = {"point": point, "file": file, "step": step, "pid": os.getpid(), "thread": thread}
    write_json_atomic(marker, info)  # whoever waits for the marker never reads half of it
    log.warning("WARNING: LAUNCHER_TEST_PAUSE_AT: save of step %d paused at %s until killed", step, point)
    while True:
        time.sleep(3600)


# ---- writing files --------------------------------------------------------------------------------------------
class _KeepError:
    """A file for torch.save that remembers the OSError of a failed write: torch replaces it with a message that
    does not say what happened (a full disk reads "unexpected pos 576 vs 534")."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def _write_safetensors(
    weights: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], like: Path
) -> None:
    save_safetensors(weights, path, metadata)
    # safetensors writes through a private temporary file (mode 0600) and renames it; give the weights the mode
    # of the checkpoint's other files, so whoever may read the run directory may read its weights.
    os.chmod(path, like.stat().st_mode & 0o777)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        sink = _KeepError(f)
        try:
            torch.save(obj, sink)
        except Exception as exc:
            if sink.error is not None:
                raise sink.error from exc
            raise


# ---- state pieces --------------------------------------------------------------------------------------------
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


@dataclass
class _Snapshot:
    """What one rank writes for one checkpoint, captured at the step boundary."""

    step: int
    best_step: int | None
    rng: dict[str, Any]
    weights: dict[str, torch.Tensor] | None = None  # these and below: main process only
    ema: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    record: str | None = None  # state.json text
    committed: bool = False  # set once the rename made it a checkpoint
    # Sharded checkpoints: every rank writes its shards of the live model and optimizer (synchronous saves only).
    shards: tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, torch.Tensor] | None] | None = None
    shard_write: Any = None  # with async_save: the future of DCP's background write of the shards


class Checkpointer:
    """Saves and finds checkpoints of one run directory. All ranks call `save`; rank 0 commits."""

    def __init__(
        self,
        run_dir: Path,
        accelerator: Any,
        keep_last: int,
        tolerate_failures: bool,
        async_save: bool = False,
        sharded: bool = False,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.sharded = sharded  # write the model and optimizer shard by shard (launcher.checkpoint.sharded)
        self.aliases = aliases or {}  # the model's tied parameter names (sharded.tied_names before sharding)
        self.accelerator = accelerator
        self.keep_last = keep_last
        self.tolerate_failures = tolerate_failures
        self.async_save = async_save
        self._buffers: dict[str, torch.Tensor] = {}  # host copies reused by every background save
        self._pending: tuple[threading.Thread, dict[str, Any], Path, str, _Snapshot] | None = None
        self._group = None
        if async_save and accelerator.num_processes > 1:
            # The background thread agrees with the other ranks over its own gloo group: a collective on the
            # default group from a second thread could interleave with the training loop's all-reduces.
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")

    # ---- saving ------------------------------------------------------------------------------------------------
    def save(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        scaler: Any,
        state: TrainState,
        meta: dict,
        ema: Any = None,
    ) -> bool:
        """Write and commit a checkpoint of `state` (in the background with async_save: then True means started);
        `ema`, if given, is an object whose state_dict() holds averaged weights (launcher.ema.EMA).
        Returns False if it failed and failures are tolerated; otherwise a failure raises CheckpointError."""
        self.wait()
        acc = self.accelerator
        name = step_dir_name(state.step)
        final, tmp = self.dir / name, self.dir / f"{TMP_PREFIX}{name}"
        # Each phase ends with an all-reduce of "did anything fail here": the reduction is also the barrier, so
        # no rank runs ahead into a collective that another rank never reaches.
        error = _attempt(lambda: self._prepare(tmp, state.step) if acc.is_main_process else None)
        if self._any_rank_failed(error is not None):
            return self._failed(error, tmp, name, None)
        snap: _Snapshot | None = None

        def capture() -> None:
            nonlocal snap
            snap = self._capture(model, optimizer, scaler, state, meta, ema, tmp)

        error = _attempt(capture)
        if self._any_rank_failed(error is not None):
            return self._failed(error, tmp, name, None)
        assert snap is not None
        if not self.async_save:
            error, failed = self._finish(tmp, final, snap, self._any_rank_failed)
            return self._failed(error, tmp, name, snap) if failed else True
        result: dict[str, Any] = {}
        started = time.perf_counter()

        def background() -> None:
            pause_point("background", snap.step, self.dir)
            try:
                result["outcome"] = self._finish(tmp, final, snap, self._background_any_failed)
            except BaseException as exc:  # a failed collective: report it at wait(), never lose it silently
                result["outcome"] = (exc, True)
            if not result["outcome"][1] and acc.is_main_process:
                log.info(
                    "checkpoint %s committed in the background (%.2fs)", name, time.perf_counter() - started
                )

        thread = threading.Thread(target=background, name="ckpt-save", daemon=True)
        self._pending = (thread, result, tmp, name, snap)
        thread.start()
        return True

    def wait(self) -> bool:
        """Block until a background save has committed. True if it did (or none was running); a failure raises
        CheckpointError, or returns False when failures are tolerated. A no-op without async_save."""
        if self._pending is None:
            return True
        thread, result, tmp, name, snap = self._pending
        self._pending = None
        thread.join()
        error, failed = result.get("outcome", (RuntimeError("the background save thread died"), True))
        return self._failed(error, tmp, name, snap) if failed else True

    def _prepare(self, tmp: Path, step: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        tmp.mkdir()
        pause_point("tmp-created", step, self.dir)

    def _capture(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        scaler: Any,
        state: TrainState,
        meta: dict,
        ema: Any,
        tmp: Path,
    ) -> _Snapshot:
        acc = self.accelerator
        snap = _Snapshot(step=state.step, best_step=state.best_step, rng=rng_state())
        if self.sharded:
            module = (
                model
                if sharded.is_sharded_model(model)
                else acc.unwrap_model(model, keep_torch_compile=False)
            )
            snap.shards = (
                module,
                sharded.optimizer_of(optimizer),
                ema.state_dict() if ema is not None else None,
            )
            if self.async_save:  # the shards are copied to host memory here, written by DCP's own thread
                snap.shard_write = sharded.save(
                    *snap.shards, folder=tmp, aliases=self.aliases, group=self._group, asynchronous=True
                )
            if acc.is_main_process:
                record = {"format": FORMAT, "state": asdict(state), "world_size": acc.num_processes, **meta}
                snap.record = json.dumps(record, indent=2) + "\n"
            return snap
        if not acc.is_main_process:
            return snap
        weights = strip_prefixes(acc.unwrap_model(model, keep_torch_compile=False).state_dict())
        weights = {k: v.detach() for k, v in weights.items()}
        averaged = (
            {k: v.detach() for k, v in strip_prefixes(ema.state_dict()).items()} if ema is not None else None
        )
        optimizer_state = optimizer.state_dict()
        scaler_state = scaler.state_dict() if scaler is not None else None
        if self.async_save:
            # Copies, because training goes on changing the live tensors while the thread writes.
            weights = self._host_weights("model", weights)
            if averaged is not None:
                averaged = self._host_weights("ema", averaged)
            optimizer_state = self._host_tree("optimizer", optimizer_state)
            scaler_state = copy.deepcopy(scaler_state)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # copies from the GPU into pinned memory are asynchronous
        snap.ema = averaged
        record = {"format": FORMAT, "state": asdict(state), "world_size": acc.num_processes, **meta}
        snap.weights, snap.optimizer, snap.scaler = weights, optimizer_state, scaler_state
        snap.record = json.dumps(record, indent=2) + "\n"
        return snap

    def _host_tensor(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """A copy in a host buffer kept from the previous save: allocating (and page-faulting) fresh memory each
        time would cost as much as the copy itself. Pinned for GPU tensors, so that the copy runs at full speed."""
        buf = self._buffers.get(key)
        if buf is None or buf.shape != value.shape or buf.dtype != value.dtype:
            buf = torch.empty(value.shape, dtype=value.dtype, pin_memory=value.is_cuda)
            self._buffers[key] = buf
        return buf.copy_(value.detach(), non_blocking=value.is_cuda)

    def _host_weights(self, key: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host copies of a state dict, tied tensors copied once and still tied (so that the file stores them
        once, as `untie` does for a synchronous save)."""
        stored, aliases, _ = untie(weights)
        host = {k: self._host_tensor(f"{key}/{k}", v) for k, v in stored.items()}
        return {k: host[aliases.get(k, k)] for k in weights}

    def _host_tree(self, key: str, obj: Any) -> Any:
        """`obj` (a state dict: dicts, lists, tuples, tensors, plain values) with every tensor copied to the host."""
        if isinstance(obj, torch.Tensor):
            return self._host_tensor(key, obj)
        if isinstance(obj, dict):
            return {k: self._host_tree(f"{key}/{k}", v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._host_tree(f"{key}/{i}", v) for i, v in enumerate(obj))
        return copy.deepcopy(obj)

    def _finish(
        self, tmp: Path, final: Path, snap: _Snapshot, any_failed: Callable[[bool], bool]
    ) -> tuple[BaseException | None, bool]:
        """Write this rank's files, agree, commit on rank 0, agree. Returns (error or None, whether it failed)."""
        with hash_pool() as pool, ThreadPoolExecutor(1, thread_name_prefix="ckpt-sync") as syncer:
            digests: dict[str, tuple[int, list[Future[str]]]] = {}
            error = _attempt(lambda: digests.update(self._write(tmp, snap, pool, syncer)))
            if any_failed(error is not None):
                return error, True
            if self.accelerator.is_main_process:
                error = _attempt(lambda: self._commit(tmp, final, snap, digests, pool))
            if any_failed(error is not None):
                return error, True
        return None, False

    def _write(
        self, tmp: Path, snap: _Snapshot, pool: ThreadPoolExecutor, syncer: ThreadPoolExecutor
    ) -> dict[str, tuple[int, list[Future[str]]]]:
        digests = {}
        synced: list[Future[None]] = []

        def put(name: str, write: Callable[[Path], Any]) -> None:
            path = tmp / name
            write(path)
            pause_point("written", snap.step, self.dir, name)
            # Each file goes to disk (fsync) and is hashed (while still in the page cache) in other threads,
            # while this one writes the next file.
            synced.append(syncer.submit(fsync, path))
            if self.accelerator.is_main_process:
                digests[name] = submit_digest(pool, path)

        rank = self.accelerator.process_index
        rng = tmp / f"rng-{rank:05d}.pt"
        put(rng.name, lambda p: _torch_save(snap.rng, p))
        if snap.shards is not None:
            # Every rank writes its own __RANK_0.distcp; the main one .metadata too.
            if snap.shard_write is not None:
                snap.shard_write.result()
            else:
                sharded.save(*snap.shards, folder=tmp, aliases=self.aliases)
            for path in sorted(tmp.glob(f"__{rank}_*.distcp")) + ([tmp / ".metadata"] if rank == 0 else []):
                pause_point("written", snap.step, self.dir, path.name)
                synced.append(syncer.submit(fsync, path))
            if snap.record is not None:
                put("state.json", lambda p: p.write_text(snap.record))
        if snap.weights is not None:
            assert snap.record is not None
            # The largest file first (with Adam, the optimizer state is twice the weights), so that hashing it
            # overlaps with writing the others.
            put("optimizer.pt", lambda p: _torch_save(snap.optimizer, p))
            metadata = {"format": "pt", "step": str(snap.step)}
            put("model.safetensors", lambda p: _write_safetensors(snap.weights, p, metadata, rng))
            if snap.ema is not None:
                put("ema.safetensors", lambda p: _write_safetensors(snap.ema, p, metadata, rng))
            if snap.scaler is not None:
                put("scaler.pt", lambda p: _torch_save(snap.scaler, p))
            put("state.json", lambda p: p.write_text(snap.record))
        for future in synced:
            future.result()  # an error that shows only at writeback (EIO, ENOSPC on some file systems) fails here
        return digests

    def _any_rank_failed(self, failed: bool) -> bool:
        return any_rank(failed)

    def _background_any_failed(self, failed: bool) -> bool:
        return any_rank(failed, group=self._group)

    def _commit(
        self,
        tmp: Path,
        final: Path,
        snap: _Snapshot,
        digests: dict[str, tuple[int, list[Future[str]]]],
        pool: ThreadPoolExecutor,
    ) -> None:
        for path in tmp.iterdir():  # the other ranks' RNG files
            if path.name not in digests:
                digests[path.name] = submit_digest(pool, path)
        manifest = {
            "format": FORMAT,
            "step": snap.step,
            "chunk_bytes": CHUNK_BYTES,
            "files": {
                name: {"size": size, "crc32": [f.result() for f in chunks]}
                for name, (size, chunks) in sorted(digests.items())
            },
        }
        pause_point("before-marker", snap.step, self.dir)
        with open(tmp / MARKER, "w") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync(tmp)
        self._supersede(snap.step)
        pause_point("before-rename", snap.step, self.dir)
        os.rename(tmp, final)
        snap.committed = True
        fsync(self.dir)
        pause_point("before-latest", snap.step, self.dir)
        # The temporary name starts with TMP_PREFIX, so that a crash before the rename leaves a leftover that the
        # next save removes.
        latest = self.dir / "latest"
        write_json_atomic(
            latest, {"checkpoint": final.name, "step": snap.step}, tmp=self.dir / f"{TMP_PREFIX}latest"
        )
        pause_point("before-rotate", snap.step, self.dir)
        self._rotate(snap.best_step)

    def _supersede(self, step: int) -> None:
        """Move checkpoints of this step or later out of the way (into `superseded/`, never deleted): they belong
        to an earlier run of this directory that went further (this one resumed from an older checkpoint or
        started with --resume none), and `--resume auto` must not pick them over this run's own."""
        moved = False
        for path in self.list():
            if step_of(path) < step:
                continue
            dest = self.dir / SUPERSEDED / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
            n = 0
            while dest.exists():
                n += 1
                dest = dest.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            dest.parent.mkdir(exist_ok=True)
            os.rename(path, dest)
            moved = True
            log.warning(
                "WARNING: moved %s to %s: it is from an earlier run of this directory that reached step %d, "
                "and this run is now saving step %d",
                path,
                dest,
                step_of(path),
                step,
            )
        if moved:
            fsync(self.dir)

    def _failed(self, error: BaseException | None, tmp: Path, name: str, snap: _Snapshot | None) -> bool:
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = f"{type(error).__name__}: {error}" if error else "another process failed to write its part"
        if snap is not None and snap.committed:
            message = (
                f"checkpoint {name} in {self.dir} was committed and is valid, but updating `latest` or removing old "
                f"checkpoints failed ({reason}). Free disk space or fix the directory's permissions"
            )
        else:
            message = (
                f"could not save checkpoint {name} in {self.dir} ({reason}). The previous checkpoints are intact "
                "and `latest` still points to the last good one. Free disk space or fix the directory's permissions"
            )
        if self.tolerate_failures:
            log.warning(
                "WARNING: %s; training continues because --checkpoint.tolerate-save-failures is set", message
            )
            return False
        raise CheckpointError(message + "; then rerun the same command to resume")

    def _remove_leftovers(self) -> None:
        for path in self.dir.glob(TMP_PREFIX + "*"):
            log.warning("removing %s, left over from an interrupted save", path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def _rotate(self, best_step: int | None) -> None:
        committed = self.list()
        keep = set(committed[-self.keep_last :])
        keep |= {p for p in committed if step_of(p) == best_step}
        for path in committed:
            if path not in keep:
                # Renamed first, so that a crash halfway through the deletion leaves a `.tmp-` leftover (removed
                # by the next save) rather than a half-deleted checkpoint that every resume warns about.
                doomed = self.dir / f"{TMP_PREFIX}delete-{path.name}"
                shutil.rmtree(doomed, ignore_errors=True)
                os.rename(path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    # ---- finding -----------------------------------------------------------------------------------------------
    def list(self) -> list[Path]:
        """Committed checkpoint directories (not verified), oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted((p for p in self.dir.iterdir() if STEP_DIR.match(p.name) and p.is_dir()), key=step_of)

    def latest_valid(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that verifies, and its record; each one skipped is named in a warning."""
        for path in reversed(self.list()):
            try:
                return path, verify(path)
            except CheckpointError as exc:
                log.warning("WARNING: skipping checkpoint %s: %s", path, exc)
        return None


def _attempt(fn: Callable[[], Any]) -> BaseException | None:
    """Run `fn`; return what it raised. Disk full, permissions, I/O errors: torch, safetensors and os each raise
    their own exception types, and all of them must reach the agreement between ranks, not unwind past it."""
    try:
        fn()
    except Exception as exc:
        return exc
    return None


def load(
    path: Path,
    model: torch.nn.Module,
    optimizer: Any,
    scaler: Any,
    accelerator: Any,
    record: dict[str, Any] | None = None,
) -> None:
    """Restore weights, optimizer, scaler and this rank's RNG from a checkpoint. `record` is what `verify` returned
    for it; the loop verifies once, on the main process, and passes it to every rank (each rank reading and
    hashing the same files would be wasted I/O). Without it, the checkpoint is verified here."""
    if record is None:
        record = verify(path)
    module = (
        model
        if sharded.is_sharded_model(model)
        else accelerator.unwrap_model(model, keep_torch_compile=False)
    )
    if sharded.is_sharded(path):  # into a sharded or a whole model alike: the shards are resharded
        sharded.load(module, sharded.optimizer_of(optimizer), path)
    elif sharded.is_sharded_model(module):  # a whole checkpoint into a sharded model
        weights = read_own(path / "model.safetensors")
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        sharded.load_whole(module, sharded.optimizer_of(optimizer), weights, optimizer_state)
    else:
        load_into(module, read_own(path / "model.safetensors"), source=str(path / "model.safetensors"))
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


def load_ema(path: Path, ema: Any) -> None:
    """The EMA weights of a checkpoint into `ema` (built from the resumed weights), if it has them."""
    if sharded.is_sharded(path) and sharded.has_ema(path):
        ema.load_state_dict(sharded.read_ema(path, ema.state_dict()))
    elif (path / "ema.safetensors").is_file():
        ema.load_state_dict(read_own(path / "ema.safetensors"))
    else:
        log.warning(
            "WARNING: %s has no EMA weights (saved without --ema.decay); the average starts from the resumed "
            "weights",
            path,
        )


def find_resume(resume: str, checkpointer: Checkpointer) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint `--resume` names and its verified record (state.json), verified once: `auto`, the newest
    valid checkpoint or None; `none`, None; otherwise the given checkpoint (a checkpoint folder, its run
    directory or its `latest` pointer), which must verify."""
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
        try:
            path = path.parent / json.loads(path.read_text())["checkpoint"]
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"--resume {resume}: unreadable pointer file ({exc})") from None
    try:
        return path, verify(path)
    except CheckpointError as exc:
        # An explicit checkpoint that does not verify is an error, never a silent fresh start.
        raise CheckpointError(
            f"--resume {resume}: {exc}. Pass a valid checkpoint, --resume auto for the newest valid one of "
            "this run, or --resume none to start fresh"
        ) from None


def resolve_resume(resume: str, checkpointer: Checkpointer) -> Path | None:
    """The checkpoint folder `find_resume` picks, or None."""
    found = find_resume(resume, checkpointer)
    return None if found is None else found[0]
