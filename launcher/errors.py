"""Errors that are the user's to fix: the CLI prints their message and exits without a traceback."""


class UserError(Exception):
    """A mistake in input (a path, a flag, a file): the message names the problem and the fix."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used (incomplete, corrupt, or from an incompatible run)."""


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite (the run stops unless --no-stop-on-nonfinite)."""


def listing(items: list[str], n: int = 6) -> str:
    """The first `n` items of a list for an error message, and how many more there are."""
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
