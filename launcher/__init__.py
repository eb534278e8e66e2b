"""launcher: a distributed training launcher for PyTorch. Recipes say what to train; the library says how.

What a recipe imports, and nothing else: `from launcher import TrainConfig, DataConfig, Datasets, Task, Loss`.
The names load on first use, so that `launcher COMMAND` tools that need no torch do not pay for importing it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(
        (
            "CheckpointConfig",
            "DataConfig",
            "EarlyStoppingConfig",
            "EMAConfig",
            "LoggingConfig",
            "OptimConfig",
            "ParallelConfig",
            "PreemptionConfig",
            "ScheduleConfig",
            "TrainConfig",
        ),
        "launcher.config",
    ),
    "Datasets": "launcher.recipe",
    **dict.fromkeys(("Task", "Loss", "Classification", "output_tensor", "no_decay_groups"), "launcher.task"),
    "Windows": "launcher.data.windows",
    "UserError": "launcher.errors",
    "ModelTarget": "launcher.models",
    "build_from_target": "launcher.models",
    "check_output": "launcher.models",
    "ImageFolderData": "launcher.data.image_folder",
    "find_class_folders": "launcher.data.image_folder",
    "open_image_folders": "launcher.data.image_folder",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'launcher' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
