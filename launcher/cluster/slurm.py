"""SLURM: one `accelerate launch` per node, with the numbers computed on that node from SLURM's variables.

`slurm/train.sbatch` starts one srun task per node, each running `python -m launcher.cluster.slurm launch RECIPE ...`.
On its node, that reads the node's own SLURM_NODEID (never the batch shell's, which is node 0's) and replaces
itself with

    accelerate launch --num_machines NODES --machine_rank NODEID --main_process_ip FIRST_HOST
        --main_process_port PORT --num_processes NODES*ON_NODE [--multi_gpu] -m launcher.train RECIPE ...

FIRST_HOST is the first name of `scontrol show hostnames $SLURM_JOB_NODELIST`, the node SLURM numbers 0, so the
process of machine rank 0 serves the rendezvous there. `launch --dry-run` prints the command instead.

Nodes may run different numbers of processes (`sbatch --nodes=2 --gpus=12 --gpus-per-node=0` can give 8 + 4 GPUs).
Accelerate starts `--num_processes // --num_machines` processes on a node (torchrun's --nproc_per_node), so each
node passes its own count ON_NODE times NODES, not the job's total (12 would start 6 on each node). torchrun's
agents then number the ranks by adding up the nodes' counts in machine-rank order (its default; not with
TORCH_ELASTIC_WORKER_IDENTICAL=1), so the job has the sum of them, 8 + 4, and WORLD_SIZE says so on every rank.

Preemption: SLURM's warning signal (`#SBATCH --signal=USR1@90`, `scancel --signal=USR1 JOB`) goes to every
process of the job step. Python's default action for SIGUSR1 is to die, and torch's elastic agent inside
`accelerate launch` does not handle it, so the agent would die and take the workers with it before they save.
`launch` therefore ignores SIGUSR1 before it execs: the agent inherits the ignore, and only the training
processes, which install their own handler (launcher.cluster.preemption), act on the signal.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import UserError

# Rendezvous ports: PORT_BASE + job id % PORT_SPAN. The range stays below Linux's ephemeral ports (32768 and up),
# so it never meets the local port of an outgoing connection, and two jobs sharing a node differ in port unless
# their ids differ by a multiple of PORT_SPAN.
PORT_BASE = 15000
PORT_SPAN = 15000

CPU_SWITCH = "LAUNCHER_CPU"
"""Set to 1 to run on CPU-only nodes: gloo instead of NCCL, processes per node from PROCS_PER_NODE."""
PROCS_PER_NODE = "LAUNCHER_PROCS_PER_NODE"
"""Processes per node: one count for every node, or one per node in SLURM's notation (`2(x3),1`); default: the GPUs
SLURM allocated on the node (1 on CPU)."""
IDENTICAL_WORKERS = "TORCH_ELASTIC_WORKER_IDENTICAL"
"""torchrun's shortcut that numbers ranks as node rank x the node's own count: wrong when the nodes' counts differ."""


@dataclass(frozen=True, kw_only=True)
class LaunchPlan:
    """What one node's `accelerate launch` needs to join the others."""

    num_machines: int
    """Nodes in the job (SLURM_NNODES)."""
    machine_rank: int
    """This node's index (its own SLURM_NODEID)."""
    main_process_ip: str
    """Host of machine rank 0: the first host of the job's node list."""
    main_process_port: int
    """Rendezvous port, derived from the job id."""
    processes_on_node: int
    """Training processes on this node (its GPUs, or its count of LAUNCHER_PROCS_PER_NODE)."""
    num_processes: int
    """Training processes in the whole job: the sum of every node's count."""
    cpu: bool
    """CPU-only nodes: gloo, no GPUs."""

    @property
    def uneven(self) -> bool:
        """Whether the nodes run different numbers of processes (seen from this node: at least one node sees it)."""
        return self.processes_on_node * self.num_machines != self.num_processes


def scontrol_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list (`node[3-5,7]`) into host names with `scontrol show hostnames`."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise UserError(f"`scontrol show hostnames {nodelist}` failed: {detail.strip()}") from None
    return out.stdout.split()


def port_for_job(job_id: int) -> int:
    """The rendezvous port of a job: the same on every node of the job, and different for neighbouring jobs."""
    return PORT_BASE + job_id % PORT_SPAN


def _gpu_count(env: Mapping[str, str], name: str) -> int | None:
    """The count in a GPU request of SLURM's (`4`, `a100:4`, `a100:2,v100:2`); None when `name` is not set."""
    spec = env.get(name)
    if not spec:
        return None
    counts = [re.fullmatch(r"(?:[^:,]+:)*(\d+)", part.strip()) for part in spec.split(",")]
    if not all(counts):
        raise UserError(f"cannot read a GPU count from {name}={spec!r}")
    return sum(int(m.group(1)) for m in counts if m)


def gpus_per_node(env: Mapping[str, str]) -> int | None:
    """GPUs SLURM allocated on this node: SLURM_GPUS_ON_NODE (set on the node), else the count in
    SLURM_GPUS_PER_NODE (`4`, `a100:4`, `a100:2,v100:2`). None when neither says."""
    if env.get("SLURM_GPUS_ON_NODE"):
        return _int_var(env, "SLURM_GPUS_ON_NODE")
    return _gpu_count(env, "SLURM_GPUS_PER_NODE")


def expand_counts(text: str, name: str = "counts") -> list[int]:
    """SLURM's compressed list of per-node counts, as in SLURM_TASKS_PER_NODE and SLURM_JOB_CPUS_PER_NODE:
    `2(x3),1` is [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise UserError(
                f"{name}={text!r} is not a count or a list of counts per node (like 8 or 8(x2),4)"
            )
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def process_counts(env: Mapping[str, str], nodes: int, rank: int, cpu: bool) -> tuple[int, int]:
    """(processes on node `rank`, processes in the job) of a job of `nodes` nodes.

    LAUNCHER_PROCS_PER_NODE gives them (one count, or one per node); CPU jobs run one process per node; GPU jobs
    one per GPU: the node's own GPUs (SLURM_GPUS_ON_NODE), and in all the job's --gpus (SLURM_GPUS), which SLURM
    may split unevenly, or else the same number on every node (--gpus-per-node, --gres)."""
    if spec := env.get(PROCS_PER_NODE):
        counts = expand_counts(spec, PROCS_PER_NODE)
        if len(counts) == 1:
            counts *= nodes
        if len(counts) != nodes:
            raise UserError(
                f"{PROCS_PER_NODE}={spec} gives {len(counts)} counts for {nodes} nodes: "
                "give one count, or one per node (2(x3),1)"
            )
        if min(counts) < 1:
            raise UserError(f"{PROCS_PER_NODE}={spec}: need at least one process on every node")
        return counts[rank], sum(counts)
    if cpu:
        return 1, nodes
    job_gpus = _gpu_count(env, "SLURM_GPUS")  # sbatch --gpus=N: the job's total
    if job_gpus:
        fix = "ask for --gpus-per-node=N instead of --gpus"
        what = f"the job's {job_gpus} GPUs (SLURM_GPUS={env['SLURM_GPUS']})"
        if env.get("SLURM_GPUS_ON_NODE"):
            on_node = _int_var(env, "SLURM_GPUS_ON_NODE")
        elif nodes == 1:
            on_node = job_gpus
        else:
            raise UserError(
                f"node {rank} cannot tell how many of {what} it has: SLURM_GPUS_ON_NODE is not set; {fix}"
            )
        if on_node < 1:
            raise UserError(f"node {rank} has none of {what}; {fix}")
        return on_node, job_gpus
    on_node = gpus_per_node(env)
    if not on_node:
        raise UserError(
            "this job has no GPUs: request them (#SBATCH --gpus-per-node=N), or run on CPU-only nodes "
            f"with {CPU_SWITCH}=1 and {PROCS_PER_NODE}=N"
        )
    return on_node, on_node * nodes


def _int_var(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None:
        raise UserError(f"{name} is not set: run this inside a SLURM job step (srun), one task per node")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not a number") from None


def plan_from_env(
    env: Mapping[str, str], hostnames: Callable[[str], list[str]] = scontrol_hostnames
) -> LaunchPlan:
    """The launch plan of the node whose environment `env` is."""
    nodes = _int_var(env, "SLURM_NNODES")
    rank = _int_var(env, "SLURM_NODEID")
    job_id = _int_var(env, "SLURM_JOB_ID")
    nodelist = env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise UserError("SLURM_JOB_NODELIST is not set: run this inside a SLURM job step (srun)")
    hosts = hostnames(nodelist)
    if len(hosts) != nodes:
        raise UserError(f"SLURM_JOB_NODELIST={nodelist} names {len(hosts)} hosts, SLURM_NNODES says {nodes}")
    if not 0 <= rank < nodes:
        raise UserError(f"SLURM_NODEID={rank} is outside 0..{nodes - 1}")
    node = env.get("SLURMD_NODENAME")
    if node in hosts and hosts.index(node) != rank:
        # Machine rank 0 serves the rendezvous on the first host; any other numbering leaves every node waiting.
        raise UserError(
            f"node {node} has SLURM_NODEID={rank} but is host {hosts.index(node)} of {nodelist}; "
            "run one task per node over all of the job's nodes (srun --ntasks-per-node=1)"
        )
    cpu = env.get(CPU_SWITCH, "0").lower() in ("1", "true", "yes")
    on_node, total = process_counts(env, nodes, rank, cpu)
    plan = LaunchPlan(
        num_machines=nodes,
        machine_rank=rank,
        main_process_ip=hosts[0],
        main_process_port=port_for_job(job_id),
        processes_on_node=on_node,
        num_processes=total,
        cpu=cpu,
    )
    if plan.uneven and env.get(IDENTICAL_WORKERS) == "1":
        raise UserError(
            f"{IDENTICAL_WORKERS}=1 numbers the ranks as if every node ran {on_node} processes, but this job's "
            f"nodes run different numbers ({on_node} here, {total} in all): unset it"
        )
    return plan


def accelerate_command(plan: LaunchPlan, train_args: Sequence[str]) -> list[str]:
    """`accelerate launch ... -m launcher.train TRAIN_ARGS` for one node."""
    cmd = [
        "accelerate",
        "launch",
        "--num_machines",
        str(plan.num_machines),
        "--machine_rank",
        str(plan.machine_rank),
        "--main_process_ip",
        plan.main_process_ip,
        "--main_process_port",
        str(plan.main_process_port),
        # Accelerate starts --num_processes // --num_machines processes here, so this node's count times the nodes;
        # torchrun adds the nodes' counts up into the job's ranks, also where they differ (module docstring).
        "--num_processes",
        str(plan.processes_on_node * plan.num_machines),
        # Stated, so Accelerate does not warn about defaults; the recipe's config sets the precision.
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if plan.num_processes > 1:
        # With ACCELERATE_USE_CPU=1 in the environment, --multi_gpu starts gloo processes on CPU
        # (`--cpu` would start a single process whatever --num_processes says).
        cmd.append("--multi_gpu")
    elif plan.cpu:
        cmd.append("--cpu")
    return [*cmd, "-m", "launcher.train", *train_args]


def sweep_overrides(text: str, index: int, source: str = "sweep file") -> list[str]:
    """The overrides of sweep task `index`: its line of `text` (blank lines and # comments skipped), shell-split."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not 0 <= index < len(lines):
        raise UserError(
            f"{source} has {len(lines)} set(s) of overrides, so array task {index} has none; "
            f"submit with --array=0-{len(lines) - 1}"
        )
    try:
        return shlex.split(lines[index], comments=True)
    except ValueError as exc:
        raise UserError(f"{source}, set {index} ({lines[index]!r}): {exc}") from None


def _launch(args: argparse.Namespace) -> int:
    env = os.environ
    train_args = list(args.train_args)
    if args.sweep is not None:
        task = _int_var(env, "SLURM_ARRAY_TASK_ID")
        path = Path(args.sweep)
        try:
            text = path.read_text()
        except OSError as exc:
            raise UserError(f"cannot read the sweep file {path}: {exc.strerror}") from None
        train_args += sweep_overrides(text, task, str(path))
    if not train_args:
        raise UserError(
            "give a recipe: python -m launcher.cluster.slurm launch RECIPE [--field.name VALUE ...]"
        )
    plan = plan_from_env(env)
    cmd = accelerate_command(plan, train_args)
    host = env.get("SLURMD_NODENAME") or os.uname().nodename
    print(
        f"launcher.cluster.slurm: node {plan.machine_rank} ({host}), {plan.processes_on_node} of {plan.num_processes} "
        f"processes: {shlex.join(cmd)}",
        flush=True,
    )
    if args.dry_run:
        return 0
    if plan.cpu:
        os.environ["ACCELERATE_USE_CPU"] = "1"
    # Ignored signals stay ignored across exec: the accelerate/elastic agent survives the warning signal, and the
    # training processes, which inherit the ignore too, replace it with their own handler.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        raise UserError(
            f"cannot run {cmd[0]}: {exc.strerror}; activate the environment that has it"
        ) from None
    return 0  # not reached: exec replaced this process


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launcher.cluster.slurm", description="Run one node's part of a SLURM training job."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    launch = sub.add_parser(
        "launch",
        help="exec `accelerate launch` for this node (one srun task per node)",
        description="Exec `accelerate launch -m launcher.train TRAIN_ARGS` with this node's rank and the job's "
        f"rendezvous. {CPU_SWITCH}=1: CPU-only nodes (gloo); {PROCS_PER_NODE}=N: processes per node "
        "(or one count per node, 2(x3),1).",
    )
    launch.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    launch.add_argument(
        "--sweep",
        metavar="FILE",
        help="append the overrides on line SLURM_ARRAY_TASK_ID of FILE (blank and # lines skipped)",
    )
    launch.add_argument("train_args", nargs=argparse.REMAINDER, help="RECIPE [--field.name VALUE ...]")
    args = parser.parse_args(argv)
    try:
        return _launch(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
