"""The `launcher` command: one subcommand per module, each with its own `main(argv) -> int`."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from launcher import __version__

# name -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("launcher.train", "train or test a recipe (the same as `python -m launcher.train`)"),
    "plot-lr": ("launcher.tools.plot_lr", "draw the learning-rate schedule a recipe would run, to a PNG"),
    "plot": (
        "launcher.tools.plot_curves",
        "draw the train/validation curves of one or more runs (overlaid, one colour each), to a PNG",
    ),
    "sweep-summary": ("launcher.tools.sweep", "tabulate the final and best metrics of the runs of a sweep"),
    "convert-ckpt": (
        "launcher.tools.convert_ckpt",
        "convert a checkpoint to clean .safetensors or .pt, safely",
    ),
    "inspect-ckpt": ("launcher.tools.inspect_ckpt", "show what a checkpoint holds, without running it"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return (
        "usage: launcher COMMAND [ARGS ...]\n\n"
        "Distributed training launcher for PyTorch. Commands:\n" + "\n".join(lines) + "\n\n"
        "`launcher COMMAND --help` explains a command. Training under several processes:\n"
        "  accelerate launch -m launcher.train recipes/mnist.py [--field.name VALUE ...]"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"launcher {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
