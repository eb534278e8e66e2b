"""Checkpoints: the format and its verification (`format`), the checkpointer that saves, finds and loads them
(`checkpointer`), weights files (`weights`), state-dict helpers (`state_dict`), and reading files of any origin
without running code from them (`safe_load`). Nothing here imports the training loop."""

from launcher.checkpoint.checkpointer import (
    PAUSE_MARKER,
    PAUSE_POINTS,
    Checkpointer,
    find_resume,
    load,
    load_ema,
    pause_point,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from launcher.checkpoint.format import (
    CHUNK_BYTES,
    FORMAT,
    MARKER,
    TrainState,
    check_compatible,
    model_fingerprint,
    step_dir_name,
    verify,
)

__all__ = [
    "CHUNK_BYTES",
    "FORMAT",
    "MARKER",
    "PAUSE_MARKER",
    "PAUSE_POINTS",
    "Checkpointer",
    "TrainState",
    "check_compatible",
    "find_resume",
    "load",
    "load_ema",
    "model_fingerprint",
    "pause_point",
    "resolve_resume",
    "rng_state",
    "set_rng_state",
    "step_dir_name",
    "verify",
]
