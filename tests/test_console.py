"""What the console shows: a progress bar on a terminal, and one log line per logging step when the output is
captured (CI, SLURM log files), where tqdm's carriage-return frames would interleave with the log lines."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIABETES = REPO.parent / "shared" / "data" / "diabetes" / "diabetes.csv"


def _cmd(out: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "launcher.train", "recipes/tabular.py", "--data.path", str(DIABETES),
            "--output-dir", str(out), "--run-name", name, "--max-epochs", "1", "--logging.every-steps", "4",
            "--logging.trackers"]  # fmt: skip


def test_captured_output_has_one_line_per_logging_step_and_no_progress_frames(tmp_path):
    result = subprocess.run(_cmd(tmp_path, "t"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    console = result.stdout + result.stderr
    assert "\r" not in console
    steps = [
        line.split("train step ")[1].split(" ")[0] for line in console.splitlines() if "train step " in line
    ]
    assert steps == ["4/12", "8/12", "12/12"]


def test_a_terminal_gets_the_progress_bar_instead(tmp_path):
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    proc = subprocess.Popen(_cmd(tmp_path, "t"), cwd=REPO, stdin=child, stdout=child, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    os.close(main)
    console = b"".join(chunks).decode(errors="replace")
    assert "\r" in console and "train: " in console and "12/12" in console  # tqdm's frames
    assert "train step " not in console
