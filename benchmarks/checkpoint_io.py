"""Checkpoint save/load time against bare safetensors and torch.save of the same tensors, in the same run.

    python -m benchmarks.checkpoint_io [--dir /tmp/ckpt-bench] [--repeats 7]

The model is a 25.2M-parameter MLP (6 x Linear 2048x2048) with its AdamW state after one step: 302 MB of tensors.
Every variant runs twice as a warm-up, then `--repeats` rounds alternate between the variants (each round starting
at a different one), and the table shows medians with the range. Files are written to `--dir` (its file system is printed) and read back from the page cache, as a resume
right after a save, or a second resume, would. Results go into docs/benchmarks.md ("Checkpoints").

Save:   launcher  = Checkpointer.save: every file fsynced, checksummed, marker, rename, `latest`, rotation
        baseline  = safetensors.save_file / torch.save of all the tensors in one file, then fsync
Load:   launcher  = resolve_resume("auto") + load: verify every checksum, restore model and optimizer
        baseline  = load_file / torch.load of that file, then restore model and optimizer the same way
                    (bare load_file alone only maps the file: no byte is read until a tensor is used)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import accelerate
import safetensors
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from benchmarks.common import machine as base_machine
from launcher import checkpoint as ckpt
from launcher.checkpoint import format as ckpt_format
from launcher.files import fsync


def build(
    width: int, depth: int, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # creates exp_avg / exp_avg_sq
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def flat_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach() for k, v in model.state_dict().items()}
    for index, entry in optimizer.state_dict()["state"].items():
        out.update({f"optimizer.{index}.{k}": v for k, v in entry.items() if torch.is_tensor(v)})
    return out


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
    """A stand-in for training between saves: forward, backward and AdamW on a batch of 256."""
    x = torch.randn(256, model[0].in_features)
    for _ in range(n):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def machine(folder: Path) -> str:
    """common.machine() plus the file system the benchmark writes to and the library versions."""
    fs = "?"
    try:
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mount, kind = line.split()[:3]
            if str(folder.resolve()).startswith(mount) and len(mount) > len(best):
                best, fs = mount, f"{kind} ({dev} on {mount})"
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{base_machine()}; {mem:.0f} GiB RAM, files on {fs}; Python {platform.python_version()}, "
        f"safetensors {safetensors.__version__}, accelerate {accelerate.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dir", type=Path, default=Path("/tmp/ckpt-bench"), help="scratch directory (emptied)"
    )
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds per variant (medians are shown)")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--train-steps", type=int, default=3, help="training steps timed against each save")
    args = parser.parse_args(argv)

    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    accelerator = Accelerator(cpu=True)
    model, optimizer = build(args.width, args.depth)
    params = sum(p.numel() for p in model.parameters())
    flat = flat_tensors(model, optimizer)
    nbytes = sum(v.numel() * v.element_size() for v in flat.values())
    print(f"# {params / 1e6:.1f}M parameters + AdamW state: {nbytes / 1e6:.0f} MB of tensors", flush=True)
    print(f"# {machine(args.dir)}", flush=True)

    sync_ckpt = ckpt.Checkpointer(args.dir / "sync", accelerator, keep_last=1, tolerate_failures=False)
    async_ckpt = ckpt.Checkpointer(
        args.dir / "async", accelerator, keep_last=1, tolerate_failures=False, async_save=True
    )
    meta = {"fingerprint": {}, "config": {}}
    state = ckpt.TrainState()

    def next_state() -> ckpt.TrainState:
        state.step += 1
        return state

    # The baselines write a new file each time and then delete the previous one, as the launcher's rotation does:
    # overwriting in place has different (and on this VM's disk, erratic) costs.
    written: dict[str, Path] = {}

    def fresh(kind: str) -> Path:
        path = args.dir / f"bare-{state.step}-{time.monotonic_ns()}.{kind}"
        return path

    def replace(kind: str, path: Path) -> None:
        fsync(path)
        if kind in written:
            written[kind].unlink()
        written[kind] = path

    def bare_st_save() -> None:
        path = fresh("safetensors")
        save_file(flat, path)
        replace("safetensors", path)

    def bare_pt_save() -> None:
        path = fresh("pt")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        replace("pt", path)

    def restore(weights: dict[str, torch.Tensor], optim_state: dict[str, Any]) -> None:
        model.load_state_dict(weights)
        optimizer.load_state_dict(optim_state)

    param_groups = optimizer.state_dict()["param_groups"]

    def bare_st_load() -> None:
        # The optimizer tensors are cloned: left as they are, they would keep the file mapped for the whole run.
        loaded = load_file(written["safetensors"])
        weights = {k[len("model.") :]: v for k, v in loaded.items() if k.startswith("model.")}
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in loaded.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.clone()
        restore(weights, {"state": state, "param_groups": param_groups})

    def bare_pt_load() -> None:
        loaded = torch.load(written["pt"], map_location="cpu", weights_only=True)
        restore(loaded["model"], loaded["optimizer"])

    def launcher_save() -> None:
        sync_ckpt.save(model, optimizer, None, next_state(), meta)

    def launcher_load() -> None:
        path = ckpt.resolve_resume("auto", sync_ckpt)
        assert path is not None
        ckpt.load(path, model, optimizer, None, accelerator)

    def cold(load: Callable[[], None], paths: Callable[[], list[Path]]) -> Callable[[], None]:
        """`load` after dropping the files from the page cache, as on a fresh node after a requeue. The pages
        are clean (fsynced), so POSIX_FADV_DONTNEED drops them; they are read back from the disk."""

        def run() -> None:
            load()

        def evict() -> None:
            for path in paths():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

        run.before = evict  # type: ignore[attr-defined]  # untimed
        return run

    def launcher_async_blocked() -> None:
        async_ckpt.save(model, optimizer, None, next_state(), meta)

    def steps_then_sync_save() -> None:
        train_steps(model, optimizer, args.train_steps)
        sync_ckpt.save(model, optimizer, None, next_state(), meta)

    def async_save_then_steps() -> None:
        async_ckpt.save(model, optimizer, None, next_state(), meta)
        train_steps(model, optimizer, args.train_steps)
        async_ckpt.wait()

    def steps_only() -> None:
        train_steps(model, optimizer, args.train_steps)

    def crc32_pass() -> None:
        with ThreadPoolExecutor(ckpt_format.hash_threads()) as pool:
            for path in [written["safetensors"]]:
                size = path.stat().st_size
                for off in range(0, size, ckpt.CHUNK_BYTES):
                    pool.submit(ckpt_format.crc_chunk, path, off, min(ckpt.CHUNK_BYTES, size - off))

    def sha256_pass(threads: int) -> Callable[[], None]:
        def chunk(path: Path, off: int, n: int) -> str:
            with open(path, "rb") as f:
                f.seek(off)
                return hashlib.sha256(f.read(n)).hexdigest()

        def run() -> None:
            with ThreadPoolExecutor(threads) as pool:
                for path in [written["safetensors"]]:
                    size = path.stat().st_size
                    for off in range(0, size, ckpt.CHUNK_BYTES):
                        pool.submit(chunk, path, off, min(ckpt.CHUNK_BYTES, size - off))

        return run

    def crc32_single() -> None:
        for path in [written["safetensors"]]:
            with open(path, "rb") as f:
                crc = 0
                while block := f.read(8 << 20):
                    crc = zlib.crc32(block, crc)

    variants: dict[str, Callable[[], None]] = {
        "save: safetensors save_file + fsync": bare_st_save,
        "save: torch.save + fsync": bare_pt_save,
        "save: launcher": launcher_save,
        "save: launcher async, blocked": launcher_async_blocked,
        "load: safetensors load_file only (lazy mmap)": lambda: load_file(written["safetensors"]),
        "load: safetensors load_file + restore": bare_st_load,
        "load: torch.load + restore": bare_pt_load,
        "load: launcher (verify + restore)": launcher_load,
        "cold load: safetensors load_file + restore": cold(bare_st_load, lambda: [written["safetensors"]]),
        "cold load: torch.load + restore": cold(bare_pt_load, lambda: [written["pt"]]),
        "cold load: launcher (verify + restore)": cold(
            launcher_load, lambda: list(sync_ckpt.list()[-1].iterdir())
        ),
        f"train {args.train_steps} steps, no save": steps_only,
        f"train {args.train_steps} steps + sync save": steps_then_sync_save,
        f"async save + train {args.train_steps} steps + wait": async_save_then_steps,
        "checksum: crc32 (zlib), 1 thread": crc32_single,
        f"checksum: crc32 ({ckpt_format.CRC32_IMPLEMENTATION}), {ckpt_format.hash_threads()} threads": crc32_pass,
        "checksum: sha256, 1 thread": sha256_pass(1),
        f"checksum: sha256, {ckpt_format.hash_threads()} threads": sha256_pass(ckpt_format.hash_threads()),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    # The async variants' background write must not overlap the next variant's timing.
    warmup = 2
    for round_ in range(warmup + args.repeats):
        # Each timed round starts at a different variant, so that none always runs right after the same
        # neighbour (on a VM's disk, one variant's writeback can slow the next one's fsync).
        order = list(variants.items())
        shift = 0 if round_ < warmup else round_ % len(order)
        for name, fn in order[shift:] + order[:shift]:
            async_ckpt.wait()
            if hasattr(fn, "before"):
                fn.before()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
        print(f"# round {round_} done", file=sys.stderr, flush=True)
    async_ckpt.wait()
    med = {name: statistics.median(ts) * 1000 for name, ts in times.items()}
    spread = {name: f"{min(ts) * 1000:.0f}-{max(ts) * 1000:.0f}" for name, ts in times.items()}

    def row(metric: str, baseline: str, launcher: str, goal: str = "") -> str:
        b, ln = med[baseline], med[launcher]
        # The ratio of the fastest runs too: on a shared VM, a run's median can carry other tenants' I/O.
        fastest = min(times[launcher]) / min(times[baseline])
        return (
            f"| {metric} | {baseline.split(': ', 1)[-1]}: {b:.0f} ms ({spread[baseline]}) | {ln:.0f} ms "
            f"({spread[launcher]}) | {ln / b:.2f}x ({fastest:.2f}x) | {goal} |"
        )

    n = args.train_steps
    print()
    print(
        "| metric | baseline: median (min-max) | launcher: median (min-max) "
        "| launcher / baseline: medians (minima) | goal |"
    )
    print("|---|---|---|---|---|")
    print(row("save", "save: safetensors save_file + fsync", "save: launcher", "<= 1.3x"))
    print(row("save", "save: torch.save + fsync", "save: launcher"))
    print(
        row(
            "load, page cache hot",
            "load: safetensors load_file + restore",
            "load: launcher (verify + restore)",
            "<= 1.1x",
        )
    )
    print(row("load, page cache hot", "load: torch.load + restore", "load: launcher (verify + restore)"))
    print(
        row(
            "load, page cache hot",
            "load: safetensors load_file only (lazy mmap)",
            "load: launcher (verify + restore)",
        )
    )
    print(
        row(
            "load, page cache cold",
            "cold load: safetensors load_file + restore",
            "cold load: launcher (verify + restore)",
            "<= 1.1x",
        )
    )
    print(
        row(
            "load, page cache cold",
            "cold load: torch.load + restore",
            "cold load: launcher (verify + restore)",
        )
    )
    print(
        row(
            "training blocked per save",
            "save: launcher",
            "save: launcher async, blocked",
            "async if <= 0.33x",
        )
    )
    print(
        row(
            f"{n} training steps + one save, until committed",
            f"train {n} steps + sync save",
            f"async save + train {n} steps + wait",
        )
    )
    print()
    print(f"{n} training steps without a save: {med[f'train {n} steps, no save']:.0f} ms")
    print(
        f"checksum pass over the {nbytes / 1e6:.0f} MB file, page cache hot (launcher uses {ckpt_format.CRC32_IMPLEMENTATION}):"
    )
    for name in variants:
        if name.startswith("checksum"):
            print(
                f"  {name.split(': ', 1)[1]:<28} {med[name]:7.1f} ms  ({nbytes / med[name] / 1e6:.1f} GB/s)"
            )
    print("\nall: median (min-max) ms")
    for name, value in med.items():
        print(f"  {name:<52} {value:8.1f}  ({spread[name]})")
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
