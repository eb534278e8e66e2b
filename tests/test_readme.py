"""Every command of README.md's ```bash blocks runs as written, from a working directory laid out like a clean
clone, or is listed in NOT_RUN with the reason it cannot run here: a new README command fails
test_every_readme_command_is_run_or_listed until it is one or the other.

How they run. Commands run in README order (a command that names a run directory made by a later one runs right
after that one), in a scratch folder `repo/` with symlinks to the repository's recipes/, slurm/ and sweeps/, beside
a `shared` symlink to the real ../shared (the commands' `../shared/data/...` paths), so `runs/` is made in the
scratch folder. `python -m launcher.train`, single-process `accelerate launch -m launcher.train` (the same thing:
one process, no accelerate config) and `launcher ...` run in this process (launcher.train.main,
launcher.tools.cli.main); the `for` loop runs its body once per value, in this process too. Multi-process
`accelerate launch` commands run as real subprocesses, in the slow test, with the commands that use their runs.

What the test adds. Every training command (not --help or --print-config) gets SMALL_RUN and its recipe's SHRINK
flags appended, after the README's own: a later flag overrides an earlier one, and these change only how long a
run takes and how big its model is. A later command that names a checkpoint of a shortened run
(`runs/mnist/checkpoints/step-00000125`) gets that run's last checkpoint instead, after checking that the command
as written ends exactly at the step the README names. The user's own files that commands take as examples are
staged in USER_FILES: real third-party checkpoints from ../shared/data/checkpoints-wild for the convert examples,
real digits for the image-folder example, and ./data as MNIST's download leaves it (this machine is offline).

Checked: each command's exit status (0 unless EXPECTED_STATUS documents another, with what the output says), each
training command's run directory and its metrics.jsonl (a `final` record at SMALL_RUN's step, so the appended
--max-steps won over the README's own; `test` in the test phase), the files the README's comments promise
(`# -> model_best.safetensors`, `# writes runs/lr-demo/curves.png`), every `-o` output, and that a --print-config
file fed back with --config gives the run the values it was printed with. `pytest -rP` shows each command's time.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import MNIST_MINI, REPO, accelerate_cmd

README = REPO / "README.md"
SHARED = REPO.parent / "shared"
WILD = SHARED / "data" / "checkpoints-wild"

# (pattern searched in the command, why it does not run here). Each pattern must match some README command.
NOT_RUN: list[tuple[str, str]] = [
    (r"^python3 -m venv |^\. \.venv/bin/activate$|^pip install ", "install step: .ci/run makes the venv and "
     "installs (torch pinned) before it runs the tests; this test runs inside that install"),
    (r"^python -m pytest", "the whole test suite, this test included"),
    (r"^sbatch ", "needs a SLURM cluster; tests/test_slurm.py submits the real templates"),
    (r"runs/sweep-<array job id>", "the runs of the sbatch array above (a placeholder job id); "
     "tests/test_sweep.py runs sweep-summary on real sweep runs"),
    (r"--data\.root photos/", "placeholders for the user's own photos/ folders and mypkg package (the digits/ "
     "example of the same recipe runs, on real digits)"),
    (r"recipes/cifar10\.py --(data\.root data|model\.arch lenet)", "downloads CIFAR-10 (170 MB; this machine "
     "is offline); the --data.fake-samples smoke run of the same recipe runs"),
    (r"--num_processes 8 ", "needs 8 GPUs; the 2-process CPU (gloo) FSDP command below runs"),
    (r"^python -m benchmarks\.", "a benchmark: minutes each, run by hand (docs/benchmarks.md)"),
]  # fmt: skip

# The trackers' packages are optional (`pip install -e ".[wandb,mlflow]"`); where they are missing, the README's
# tracker command is listed too (tests/test_trackers.py skips likewise).
_MISSING = [name for name in ("wandb", "mlflow") if importlib.util.find_spec(name) is None]
if _MISSING:
    NOT_RUN.append(
        (r"--logging\.trackers .*\b(wandb|mlflow)\b", f"needs {' and '.join(_MISSING)}, not installed")
    )

# Appended to every training command: a short run, no step evaluations (the final one stays), no bar.
SMALL_RUN = ["--max-steps", "2", "--eval-every-steps", "0", "--logging.no-progress-bar"]
# Appended per recipe, in every phase (so a test or predict phase loads the weights its training run wrote).
SHRINK = {
    "recipes/mnist.py": ["--model.channels", "4", "--model.hidden", "8"],
    "recipes/charlm.py": ["--model.layers", "1", "--model.width", "16", "--model.heads", "2",
                         "--sample.characters", "20"],
    "recipes/cifar10.py": ["--data.fake-samples", "16", "--data.batch-size", "4"],
    "recipes/imagefolder.py": ["--model.width", "4"],
    "recipes/tabular.py": [],
}  # fmt: skip

# Documented exit statuses other than 0, by a pattern of the command: (status, what its output says).
EXPECTED_STATUS = {
    # `launcher convert-ckpt --help`: "1 converted, but does not fit the --check recipe" (an ImageNet-style
    # checkpoint does not fit the MNIST recipe's model; the command's comment says it reports what does not fit).
    r"--check recipes/mnist\.py": (1, "does not fit the model: missing keys"),
}


def _stage_user_files(repo: Path) -> None:
    """The user's own files that README commands take as examples (see USER_FILES)."""
    from digit_folders import write_digit_folders

    (repo / "data").symlink_to(MNIST_MINI.resolve(), target_is_directory=True)
    (repo / "model_best.pth.tar").symlink_to(WILD / "dp_bearpaw_resnet_model_best.pth.tar")
    (repo / "old.pt").symlink_to(WILD / "plain_lenet_cifar10_checkpoint.pt")
    # pytorch/examples' imagenet main.py wraps only alexnet's and vgg's `features` in DataParallel and saves
    # {'epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer'}: keys `features.module.0.weight`, `classifier...`.
    net = nn.Module()
    net.features = nn.DataParallel(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
    net.classifier = nn.Linear(4, 10)
    torch.save({"epoch": 1, "arch": "alexnet", "state_dict": net.state_dict(), "best_acc1": 10.0},
               repo / "old.pth.tar")  # fmt: skip
    write_digit_folders(repo / "digits", MNIST_MINI, {"train": 7, "val": 2})


USER_FILES = {
    "data/": "MNIST as --data.download leaves it in ./data (mnist-mini; this machine is offline)",
    "model_best.pth.tar": "checkpoints-wild: a real model_best.pth.tar (DataParallel keys in a wrapper dict)",
    "old.pt": "checkpoints-wild: a real plain, unprefixed state dict",
    "old.pth.tar": "pytorch/examples imagenet layout (`features.module.` keys under `state_dict`), built here",
    "digits/": "7 training and 2 validation PNG digits per class, written from mnist-mini (tests/digit_folders.py)",
}


# --- reading the README -----------------------------------------------------------------------------------------


@dataclass
class Command:
    text: str  # as written: continuations joined, comment stripped
    line: int  # in README.md
    comment: str = ""

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def _strip_comment(line: str) -> tuple[str, str]:
    """(command, comment): a `#` at the start or after a blank, outside quotes, starts a comment."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def readme_commands(text: str | None = None) -> list[Command]:
    """The commands of the ```bash blocks, in order; `a && b` is two commands, `...` lines are flag fragments."""
    text = README.read_text() if text is None else text
    commands = []
    for block in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
        first = text.count("\n", 0, block.start(1)) + 1
        lines = block.group(1).splitlines()
        i = 0
        while i < len(lines):
            start, logical = i, lines[i]
            while logical.endswith("\\") and i + 1 < len(lines):
                i += 1
                logical = logical[:-1].rstrip() + " " + lines[i].strip()
            i += 1
            command, comment = _strip_comment(logical.strip())
            if not command or command.startswith("..."):
                continue
            parts = re.split(r"\s+&&\s+", command)
            for k, part in enumerate(parts):
                commands.append(Command(part, first + start, comment if k == len(parts) - 1 else ""))
    return commands


# --- what each command is ---------------------------------------------------------------------------------------


@dataclass
class Step:
    """One runnable command: `train` (launcher.train.main), `cli` (launcher.tools.cli.main), `multi` (accelerate
    with several processes, a subprocess), `shell` (bash); `loop` runs its `body` steps."""

    command: Command
    kind: str
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    launch: list[str] = field(default_factory=list)  # accelerate launch options
    stdout: str | None = None  # `> FILE`
    body: list[Step] = field(default_factory=list)

    def steps(self) -> list[Step]:
        return self.body if self.kind == "loop" else [self]

    @property
    def trains(self) -> bool:
        return self.kind in ("train", "multi") and not {"--help", "--print-config"} & set(self.argv)

    def flag(self, name: str) -> str | None:
        values = [self.argv[i + 1] for i, a in enumerate(self.argv[:-1]) if a == name]
        return values[-1] if values else None

    def produces(self) -> set[str]:
        """`runs/NAME` folders a training command makes (its run directory, or its --output-dir under runs/)."""
        if self.kind == "loop":
            return {d for s in self.body for d in s.produces()}
        if not self.trains:
            return set()
        out = Path(self.flag("--output-dir") or "runs")
        path = out / self.flag("--run-name") if self.flag("--run-name") else out
        return {"/".join(path.parts[:2])} if path.parts[0] == "runs" and len(path.parts) > 1 else set()

    def uses(self) -> set[str]:
        """`runs/NAME` folders it reads (arguments under runs/, not its own --output-dir)."""
        if self.kind == "loop":
            return {d for s in self.body for d in s.uses()}
        skip = {self.flag("--output-dir")}
        return {"/".join(Path(a).parts[:2]) for a in self.argv if a.startswith("runs/") and a not in skip}


def not_run_reason(command: Command) -> str | None:
    return next((why for pattern, why in NOT_RUN if re.search(pattern, command.text)), None)


def parse(command: Command) -> Step | None:
    """The Step that runs `command`, or None when this test does not know how."""
    loop = re.fullmatch(r"for (\w+) in ([^;]+); do (.+); done", command.text)
    if loop:
        var, values, body = loop.groups()
        if ";" in body:
            return None
        steps = [
            parse(Command(re.sub(rf"\$\{{?{var}\}}?", value, body), command.line))
            for value in shlex.split(values)
        ]
        return None if None in steps else Step(command, "loop", body=steps)
    words = shlex.split(command.text)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    stdout = None
    if ">" in words:
        i = words.index(">")
        stdout = words[i + 1]
        del words[i : i + 2]
    if words[:3] == ["python", "-m", "launcher.train"]:
        return Step(command, "train", words[3:], env, stdout=stdout)
    if (
        words[:2] == ["accelerate", "launch"]
        and "-m" in words
        and words[words.index("-m") + 1] == "launcher.train"
    ):
        i = words.index("-m")
        launch, argv = words[2:i], words[i + 2 :]
        if not launch:  # one process, no accelerate config: the same as `python -m launcher.train`
            return Step(command, "train", argv, env, stdout=stdout)
        return Step(command, "multi", argv, env, launch=launch, stdout=stdout)
    if words[:1] == ["launcher"]:
        return Step(command, "cli", words[1:], env, stdout=stdout)
    if words[:2] == ["mkdir", "-p"]:
        return Step(command, "shell", words, env, stdout=stdout)
    return None


def plan() -> tuple[list[Step], list[Step]]:
    """(the steps of the fast test, the steps of the slow one), in run order: README order, except that a
    command using a run directory that a later command makes runs right after that one. Multi-process commands
    and everything that uses their runs are slow."""
    steps = [s for c in readme_commands() if not not_run_reason(c) and (s := parse(c))]
    ordered: list[Step] = []
    waiting: list[Step] = []  # each waits for a later command that makes a run directory it uses
    for i, step in enumerate(steps):
        made = {d for s in ordered for d in s.produces()}
        not_yet = {d for s in steps[i + 1 :] for d in s.produces()} - made  # made only by a later command
        if step.uses() & not_yet:
            waiting.append(step)
            continue
        ordered.append(step)
        not_yet -= step.produces()
        for w in [w for w in waiting if not w.uses() & not_yet]:
            ordered.append(w)
            waiting.remove(w)
    ordered += waiting
    fast, slow = [], []
    for step in ordered:
        multi = any(t.kind == "multi" for t in step.steps())
        (slow if multi or step.uses() & {d for s in slow for d in s.produces()} else fast).append(step)
    return fast, slow


def test_every_readme_command_is_run_or_listed():
    commands = readme_commands()
    assert len(commands) > 30, "the README's commands were not found"
    unknown = [str(c) for c in commands if not not_run_reason(c) and parse(c) is None]
    assert not unknown, "README commands this test neither runs nor lists in NOT_RUN:\n" + "\n".join(unknown)
    stale = [p for p, _ in NOT_RUN if not any(re.search(p, c.text) for c in commands)]
    assert not stale, f"NOT_RUN patterns that match no README command any more: {stale}"
    fast, _ = plan()
    assert all(t.kind != "multi" for s in fast for t in s.steps())


def test_readme_parsing():
    text = (
        "x\n```bash\na --b 1 \\\n    --c '#x' # note\n... --flag\nfor v in 1 2; do launcher plot r$v; done\n"
        "p && q  # both\n```\n```python\nnot a command\n```\n"
    )
    got = [(c.text, c.line, c.comment) for c in readme_commands(text)]
    assert got == [
        ("a --b 1 --c '#x'", 3, "note"),
        ("for v in 1 2; do launcher plot r$v; done", 6, ""),
        ("p", 7, ""),
        ("q", 7, "both"),
    ]
    loop = parse(Command("for v in 1 2; do launcher plot r$v; done", 1))
    assert loop is not None and [s.argv for s in loop.body] == [["plot", "r1"], ["plot", "r2"]]


# --- running them -----------------------------------------------------------------------------------------------


@pytest.fixture
def clean_clone(tmp_path, monkeypatch) -> Iterator[Path]:
    """tmp/repo laid out like a clean clone (recipes/, slurm/, sweeps/), tmp/shared -> the real ../shared, and
    the user's example files staged; the current directory is tmp/repo; one torch thread (the in-process runs
    are tiny, and 2 shared cores make more threads slower); the environment restored afterwards."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("recipes", "slurm", "sweeps"):
        (repo / name).symlink_to(REPO / name, target_is_directory=True)
    (tmp_path / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    _stage_user_files(repo)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # W&B and others keep their settings there
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield repo
    finally:
        torch.set_num_threads(threads)
        if "wandb" in sys.modules:  # the tracker command's W&B service process
            sys.modules["wandb"].teardown()


@contextlib.contextmanager
def _env(extra: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(extra)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _expand(word: str) -> list[str]:
    """A shell pattern, as bash expands it (sorted matches; the word itself when none match)."""
    return (sorted(glob.glob(word)) or [word]) if re.search(r"[*?]", word) else [word]


class Runner:
    def __init__(self, repo: Path, capsys) -> None:
        self.repo, self.capsys = repo, capsys
        # shortened run -> the step its command as written ends at (None: unknown, SHRINK changes its data)
        self.written_end: dict[Path, int | None] = {}
        self.printed: dict[str, list[str]] = {}  # --print-config output file -> the flags it was printed with
        self.timings: list[tuple[float, str]] = []
        self.checked: list[str] = []  # what was checked beyond exit statuses
        self.last_default_name = ""

    def run(self, step: Step) -> None:
        for s in step.steps():
            start = time.perf_counter()
            self.run_one(s)
            self.timings.append((time.perf_counter() - start, s.command.text))

    def run_one(self, step: Step) -> None:
        argv = [e for a in step.argv for e in _expand(self.substitute(a))]
        if step.trains:
            assert argv[0] in SHRINK, f"{step.command}: say in SHRINK how to make {argv[0]} small"
            argv += SMALL_RUN + SHRINK[argv[0]]
        runs = self.run_dirs(step)
        if step.trains and not step.flag("--run-name"):  # default names have a 1-s clock: one run per second
            while time.strftime("%Y%m%d-%H%M%S") == self.last_default_name:
                time.sleep(0.05)
            self.last_default_name = time.strftime("%Y%m%d-%H%M%S")
        status, out, err = self.execute(step, argv)
        expected, says = next(
            (v for p, v in EXPECTED_STATUS.items() if re.search(p, step.command.text)), (0, "")
        )
        assert status == expected and says in out + err, (
            f"{step.command}\nran as {shlex.join(argv)}\nexit status {status}, expected {expected} {says!r}\n"
            f"--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
        )
        if step.stdout:
            Path(step.stdout).write_text(out)
        self.check(step, argv, runs, out)

    def execute(self, step: Step, argv: list[str]) -> tuple[int, str, str]:
        if step.kind == "multi":
            assert step.env.get("ACCELERATE_USE_CPU") == "1", f"{step.command}: only CPU launches run here"
            processes = int(step.launch[step.launch.index("--num_processes") + 1])
            assert step.launch == ["--multi_gpu", "--num_processes", str(processes)], step.command
            env = {**os.environ, **step.env, "OMP_NUM_THREADS": "1"}
            result = subprocess.run(accelerate_cmd(processes, *argv), cwd=self.repo, env=env,
                                    capture_output=True, text=True, timeout=120)  # fmt: skip
            return result.returncode, result.stdout, result.stderr
        if step.kind == "shell":
            result = subprocess.run(argv, cwd=self.repo, capture_output=True, text=True, timeout=30)
            return result.returncode, result.stdout, result.stderr
        from launcher.tools.cli import main as cli
        from launcher.train import main as train

        self.capsys.readouterr()
        with _env(step.env):
            try:
                status = (train if step.kind == "train" else cli)(argv)
            except SystemExit as exc:  # --help
                status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        out, err = self.capsys.readouterr()
        return status, out, err

    def substitute(self, arg: str) -> str:
        """A checkpoint of a shortened run -> its last checkpoint, once the README's step is checked."""
        m = re.fullmatch(r"(runs/.+)/checkpoints/step-(\d{8})", arg)
        if not m or Path(m.group(1)) not in self.written_end:
            return arg
        run_dir, step = Path(m.group(1)), int(m.group(2))
        assert self.written_end[run_dir] is not None, f"{arg}: SHRINK changes the length of {run_dir}'s run"
        assert step == self.written_end[run_dir], (
            f"{arg}: the command that makes {run_dir}, as written, ends at step {self.written_end[run_dir]}"
        )
        latest = json.loads((run_dir / "checkpoints" / "latest").read_text())["checkpoint"]
        return str(run_dir / "checkpoints" / latest)

    @staticmethod
    def run_dirs(step: Step) -> set[Path]:
        out = Path(step.flag("--output-dir") or "runs")
        return {p.parent for p in out.glob("*/config.json")} if out.is_dir() else set()

    def check(self, step: Step, argv: list[str], before: set[Path], out: str) -> None:
        what = str(step.command)
        if "--help" in argv:
            assert "--max-epochs" in out, f"{what}: no help text"
        if "--print-config" in argv:
            assert step.stdout and Path(step.stdout).read_text().strip(), f"{what}: printed nothing"
            self.printed[step.stdout] = [a for a in argv[1:] if a != "--print-config"]
        if step.trains:
            self.check_run(step, before)
        for m in re.finditer(r"(?:->|writes) (\S+?),?(?:\s|$)", step.command.comment):
            promised = m.group(1).replace("...", "*")
            assert list(Path().glob(promised)), f"{what}: no {promised} (its comment promises it)"
            self.checked.append(f"{promised} (promised by its comment)")
        if "-o" in argv:
            out_file = argv[argv.index("-o") + 1]
            assert Path(out_file).is_file(), f"{what}: no {out_file}"
            self.checked.append(f"{out_file} (-o)")

    def check_run(self, step: Step, before: set[Path]) -> None:
        """The run directory and its records; what a shortened run would have reached as written."""
        what = str(step.command)
        if name := step.flag("--run-name"):
            run_dir = Path(step.flag("--output-dir") or "runs") / name
        else:
            new = self.run_dirs(step) - before
            assert len(new) == 1, f"{what}: expected one new run directory, got {new}"
            (run_dir,) = new
        assert (run_dir / "config.json").is_file(), f"{what}: no {run_dir}/config.json"
        config = json.loads((run_dir / "config.json").read_text())
        phase = step.flag("--phase") or "train"
        if phase == "predict":
            return  # no metrics: the recipe's predict() writes what it writes (checked by its comment, if any)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["kind"] == ("final" if phase == "train" else "test"), (what, records[-1])
        self.checked.append(f"{run_dir}/metrics.jsonl ({records[-1]['kind']})")
        if phase == "train":
            # SMALL_RUN's --max-steps, after the README's own (--max-steps 40, 20, 8), is the one that counts.
            short = int(SMALL_RUN[SMALL_RUN.index("--max-steps") + 1])
            assert records[-1]["step"] == short, (what, records[-1])
            self.written_end[run_dir] = self.as_written_end(step, records[0])
        if step.flag("--config"):
            self.check_fed_back(step, config)
            self.checked.append(f"{run_dir}/config.json holds the values of {step.flag('--config')}")

    def as_written_end(self, step: Step, setup: dict) -> int | None:
        """The last step of the training command as written (without SMALL_RUN and SHRINK), from the steps per
        epoch of its run; None when SHRINK changes the data, and with it the steps per epoch."""
        from launcher.recipe import load_recipe, parse_config

        assert setup["kind"] == "setup", setup
        cfg = parse_config(load_recipe(step.argv[0]), step.argv[1:], prog="README")
        if cfg.max_steps is not None:
            return cfg.max_steps
        if any(a.startswith("--data.") for a in SHRINK[step.argv[0]]):
            return None
        return setup["steps_per_epoch"] * cfg.max_epochs

    def check_fed_back(self, step: Step, config: dict) -> None:
        """The values a --print-config file was printed with are the run's, unless this command overrides them."""
        printed = self.printed.get(step.flag("--config") or "")
        assert printed is not None, f"{step.command}: --config of a file no README command printed"
        for name, value in zip(printed[::2], printed[1::2], strict=True):
            if name in step.argv:
                continue
            got = config
            for key in name.removeprefix("--").replace("-", "_").split("."):
                got = got[key]
            assert str(got) == value or float(got) == float(value), (
                f"{step.command}: {name} is {got}, not {value}"
            )


def _run_all(steps: list[Step], repo: Path, capsys) -> Runner:
    runner = Runner(repo, capsys)
    for step in steps:
        runner.run(step)
    # Shown with -rP or on a failure: what ran, how long each took, and what was checked.
    print("\n".join(f"{t:6.1f}s  {text}" for t, text in runner.timings))
    print("checked: " + "; ".join(runner.checked))
    return runner


def test_readme_commands_run_as_written(clean_clone, capsys):
    fast, _ = plan()
    runner = _run_all(fast, clean_clone, capsys)
    assert len(runner.timings) >= 20
    assert any("holds the values of" in c for c in runner.checked), "no --print-config file was fed back"
    assert sum("promised by its comment" in c for c in runner.checked) >= 3


@pytest.mark.slow
def test_readme_multiprocess_commands_run_as_written(clean_clone, capsys):
    _, slow = plan()
    if not slow:
        pytest.skip("the README shows no multi-process command that runs on CPUs")
    _run_all(slow, clean_clone, capsys)
