"""SLURM: the per-node launch arithmetic (fake SLURM variables, a stub scontrol), and the sbatch templates on a
real one-node SLURM cluster that the `slurm_cluster` fixture starts from Debian's packages (slurmctld, slurmd,
slurm-client, munge) and stops afterwards.

The cluster tests train 2 gloo processes on CPU for a few dozen steps: `sbatch --wait` completes and leaves a run
directory; a real USR1 makes the job save, requeue itself, resume and finish with weights bit-identical to the
uninterrupted run; a 3-task job array runs and `launcher sweep-summary` reports it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.cluster import slurm

REPO = Path(__file__).resolve().parents[1]
MNIST_MINI = REPO.parent / "shared" / "data" / "mnist-mini"
VENV_BIN = str(Path(sys.executable).parent)

# ---- the launch arithmetic, with fake SLURM variables ------------------------------------------------------------


def _stub(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + script)
    path.chmod(0o755)


@pytest.fixture
def stub_path(tmp_path: Path) -> Path:
    """A folder of stubs, first on PATH: scontrol expands node[3-5,7] as SLURM would; accelerate reports how it
    was started (arguments, ACCELERATE_USE_CPU, and its ignored-signal mask) instead of launching anything."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _stub(
        stubs,
        "scontrol",
        'if [ "$1 $2 $3" = "show hostnames node[3-5,7]" ]; then printf "node3\\nnode4\\nnode5\\nnode7\\n"; '
        'elif [ "$1 $2 $3" = "show hostnames node[3-4]" ]; then printf "node3\\nnode4\\n"; '
        'else echo "scontrol stub: unexpected $*" >&2; exit 1; fi\n',
    )
    _stub(
        stubs,
        "accelerate",
        'echo "ARGS $*"; echo "USE_CPU ${ACCELERATE_USE_CPU:-unset}"; grep SigIgn /proc/$$/status\n',
    )
    return stubs


def _node_env(stubs: Path, node_id: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SLURMD_", "LAUNCHER_"))}
    env.pop("ACCELERATE_USE_CPU", None)
    return {
        **env,
        "PATH": f"{stubs}:{env['PATH']}",
        "SLURM_JOB_ID": "123457",
        "SLURM_NNODES": "4",
        "SLURM_JOB_NODELIST": "node[3-5,7]",
        "SLURM_NODEID": str(node_id),
        **extra,
    }


def _launch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cluster.slurm", "launch", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("gpus", [{"SLURM_GPUS_PER_NODE": "8"}, {"SLURM_GPUS_PER_NODE": "h100:8"}])
def test_each_node_gets_its_own_rank_and_the_first_host_as_main(
    stub_path: Path, gpus: dict[str, str]
) -> None:
    port = slurm.PORT_BASE + 123457 % slurm.PORT_SPAN
    for node, host in enumerate(["node3", "node4", "node5", "node7"]):
        env = _node_env(stub_path, node, SLURMD_NODENAME=host, **gpus)
        out = _launch(env, "recipes/mnist.py", "--optim.lr", "0.1")
        assert out.returncode == 0, out.stderr
        args = next(line for line in out.stdout.splitlines() if line.startswith("ARGS ")).split()[1:]
        assert args[:1] == ["launch"]
        assert _flag(args, "--num_machines") == "4"
        assert _flag(args, "--machine_rank") == str(node)
        assert _flag(args, "--main_process_ip") == "node3"
        assert _flag(args, "--main_process_port") == str(port)
        assert _flag(args, "--num_processes") == "32"  # 4 nodes x 8 GPUs
        assert "--multi_gpu" in args and "--cpu" not in args
        assert args[-5:] == ["-m", "launcher.train", "recipes/mnist.py", "--optim.lr", "0.1"]
        assert "USE_CPU unset" in out.stdout


def test_launch_ignores_usr1_so_only_the_trainer_acts_on_it(stub_path: Path) -> None:
    """The exec'd accelerate (the elastic agent) must inherit an ignored SIGUSR1, or the warning kills it."""
    out = _launch(_node_env(stub_path, 0, SLURM_GPUS_ON_NODE="2"), "recipes/mnist.py")
    assert out.returncode == 0, out.stderr
    mask = int(re.search(r"SigIgn:\s*([0-9a-f]+)", out.stdout).group(1), 16)
    assert mask & (1 << (signal.SIGUSR1 - 1)), f"SIGUSR1 is not ignored in the launched process: {out.stdout}"
    assert not mask & (1 << (signal.SIGTERM - 1)), "SIGTERM must keep reaching the agent, which forwards it"


def test_cpu_switch_runs_gloo_processes_per_node(stub_path: Path) -> None:
    env = _node_env(stub_path, 1, LAUNCHER_CPU="1", LAUNCHER_PROCS_PER_NODE="2")
    out = _launch(env, "recipes/mnist.py")
    assert out.returncode == 0, out.stderr
    args = out.stdout.splitlines()[1].split()[
        1:
    ]  # line 0 is launcher.cluster.slurm's own report of the command
    assert _flag(args, "--num_processes") == "8" and _flag(args, "--machine_rank") == "1"
    assert "--multi_gpu" in args  # with ACCELERATE_USE_CPU=1: gloo on CPU (--cpu would start one process)
    assert "USE_CPU 1" in out.stdout

    single = _node_env(stub_path, 0, LAUNCHER_CPU="1", SLURM_NNODES="1", SLURM_JOB_NODELIST="node[3-5,7]")
    plan = slurm.plan_from_env(single, hostnames=lambda nodes: ["node3"])
    assert plan.num_processes == 1
    assert "--cpu" in slurm.accelerate_command(plan, ["r.py"])


def test_dry_run_prints_the_command_without_running_it(stub_path: Path) -> None:
    out = _launch(_node_env(stub_path, 2, SLURM_GPUS_PER_NODE="4"), "--dry-run", "recipes/mnist.py")
    assert out.returncode == 0, out.stderr
    assert "ARGS" not in out.stdout
    assert "launcher.cluster.slurm: node 2" in out.stdout and "--num_processes 16" in out.stdout


def test_gpu_counts_and_ports() -> None:
    assert slurm.gpus_per_node({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8"}) == 4
    assert slurm.gpus_per_node({"SLURM_GPUS_PER_NODE": "a100:2,v100:1"}) == 3
    assert slurm.gpus_per_node({}) is None
    ports = {slurm.port_for_job(job) for job in range(100_000, 100_050)}
    assert len(ports) == 50 and all(slurm.PORT_BASE <= p < 32768 for p in ports)  # below the ephemeral range


# What SLURM 22.05 exports to the two tasks of `srun --ntasks-per-node=1` in `sbatch --nodes=2 --gpus=12
# --gpus-per-node=0` (the 0 drops the template's --gpus-per-node=8, which sbatch would refuse beside --gpus) when it
# splits the 12 GPUs 8 + 4: the job's count, the node's own count, and node 0's SLURM_JOB_GPUS on both nodes.
UNEVEN_GPUS = [
    {
        "SLURM_GPUS": "12",
        "SLURM_GPUS_PER_NODE": "0",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7",
        "SLURM_STEP_GPUS": "0,1,2,3,4,5,6,7",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
        "SLURM_TASKS_PER_NODE": "1(x2)",
        "SLURM_JOB_CPUS_PER_NODE": "32(x2)",
    },
    {
        "SLURM_GPUS": "12",
        "SLURM_GPUS_PER_NODE": "0",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7",
        "SLURM_STEP_GPUS": "0,1,2,3",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3",
        "SLURM_TASKS_PER_NODE": "1(x2)",
        "SLURM_JOB_CPUS_PER_NODE": "32(x2)",
    },
]


def test_uneven_gpus_per_node_start_each_nodes_share_of_one_job_total(stub_path: Path) -> None:
    """8 + 4 GPUs: every node reports the job's 12 processes, and tells accelerate its own count. Accelerate starts
    --num_processes // --num_machines processes on a node, so node 1 must say 2 x 4 (the job's 12 would start 6
    on each node), and torchrun numbers the ranks by adding up the nodes' counts: 0-7 on node 0, 8-11 on node 1."""
    for node, (gpus, own) in enumerate(zip(UNEVEN_GPUS, (8, 4), strict=True)):
        env = _node_env(stub_path, node, SLURM_NNODES="2", SLURM_JOB_NODELIST="node[3-4]", **gpus)
        plan = slurm.plan_from_env(env, hostnames=lambda nodes: ["node3", "node4"])
        assert plan.num_processes == 12, f"node {node} counts {plan.num_processes} processes in the job"
        assert (plan.processes_on_node, plan.machine_rank) == (own, node)
        out = _launch(env, "recipes/mnist.py")
        assert out.returncode == 0, out.stderr
        report, accelerate = out.stdout.splitlines()[:2]
        assert f"launcher.cluster.slurm: node {node} (" in report and f"{own} of 12 processes" in report
        args = accelerate.split()[1:]
        assert _flag(args, "--num_processes") == str(2 * own) and _flag(args, "--num_machines") == "2"
        assert "--multi_gpu" in args


def test_per_node_counts_read_slurms_compressed_lists(stub_path: Path) -> None:
    assert slurm.expand_counts("2(x3),1") == [2, 2, 2, 1]
    assert slurm.expand_counts("8(x2),4") == [8, 8, 4]
    assert slurm.expand_counts("4") == [4]
    with pytest.raises(slurm.UserError, match=r"X='2\(x\),1' is not"):
        slurm.expand_counts("2(x),1", "X")
    # LAUNCHER_PROCS_PER_NODE takes one count for every node, or one per node in SLURM's notation.
    for node, own in enumerate([2, 2, 2, 1]):
        env = _node_env(stub_path, node, LAUNCHER_CPU="1", LAUNCHER_PROCS_PER_NODE="2(x3),1")
        plan = slurm.plan_from_env(env, hostnames=lambda nodes: ["node3", "node4", "node5", "node7"])
        assert (plan.processes_on_node, plan.num_processes) == (own, 7)
        assert _flag(slurm.accelerate_command(plan, ["r.py"]), "--num_processes") == str(4 * own)
    env = _node_env(stub_path, 3, LAUNCHER_PROCS_PER_NODE="3", SLURM_GPUS_ON_NODE="8")
    plan = slurm.plan_from_env(env, hostnames=lambda nodes: ["node3", "node4", "node5", "node7"])
    assert (plan.processes_on_node, plan.num_processes) == (3, 12)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({}, "this job has no GPUs"),
        ({"SLURM_NNODES": "3"}, "names 4 hosts, SLURM_NNODES says 3"),
        ({"SLURM_NODEID": "4", "SLURM_GPUS_PER_NODE": "1"}, "SLURM_NODEID=4 is outside 0..3"),
        ({"SLURM_GPUS_PER_NODE": "lots"}, "cannot read a GPU count"),
        ({"SLURM_JOB_NODELIST": "other[1-2]"}, "scontrol show hostnames other[1-2]` failed"),
        (
            {"SLURMD_NODENAME": "node5", "SLURM_GPUS_PER_NODE": "1"},
            "node node5 has SLURM_NODEID=0 but is host 2 of node[3-5,7]",
        ),
        # --gpus=N without the node's own share (SLURM_GPUS_ON_NODE): the nodes cannot know their counts.
        (
            {"SLURM_GPUS": "12", "SLURM_GPUS_PER_NODE": "0"},
            "node 0 cannot tell how many of the job's 12 GPUs (SLURM_GPUS=12) it has: SLURM_GPUS_ON_NODE is not "
            "set; ask for --gpus-per-node=N instead of --gpus",
        ),
        (
            {"SLURM_GPUS": "12", "SLURM_GPUS_ON_NODE": "0"},
            "node 0 has none of the job's 12 GPUs (SLURM_GPUS=12); ask for --gpus-per-node=N instead of --gpus",
        ),
        ({"SLURM_GPUS_ON_NODE": "four"}, "SLURM_GPUS_ON_NODE='four' is not a number"),
        (
            {"LAUNCHER_PROCS_PER_NODE": "2,1"},
            "LAUNCHER_PROCS_PER_NODE=2,1 gives 2 counts for 4 nodes: give one count, or one per node (2(x3),1)",
        ),
        (
            {"LAUNCHER_PROCS_PER_NODE": "2(x3),0"},
            "LAUNCHER_PROCS_PER_NODE=2(x3),0: need at least one process",
        ),
        (
            {"LAUNCHER_PROCS_PER_NODE": "two"},
            "LAUNCHER_PROCS_PER_NODE='two' is not a count or a list of counts",
        ),
        (
            {**UNEVEN_GPUS[0], "TORCH_ELASTIC_WORKER_IDENTICAL": "1"},
            "TORCH_ELASTIC_WORKER_IDENTICAL=1 numbers the ranks as if every node ran 8 processes, but this job's "
            "nodes run different numbers (8 here, 12 in all): unset it",
        ),
    ],
)
def test_bad_slurm_environments_say_what_is_wrong(stub_path: Path, change: dict, message: str) -> None:
    out = _launch({**_node_env(stub_path, 0), **change}, "recipes/mnist.py")
    assert out.returncode == 2
    assert message in out.stderr


def test_outside_a_job_step_the_error_says_so(stub_path: Path) -> None:
    env = {k: v for k, v in _node_env(stub_path, 0).items() if k != "SLURM_NNODES"}
    out = _launch(env, "recipes/mnist.py")
    assert out.returncode == 2 and "SLURM_NNODES is not set" in out.stderr


def test_sweep_lines_skip_comments_and_name_the_array_range() -> None:
    text = "# lr sweep\n--optim.lr 0.01\n\n--optim.lr 0.1 --run-name 'a b'  # trailing\n"
    assert slurm.sweep_overrides(text, 0) == ["--optim.lr", "0.01"]
    assert slurm.sweep_overrides(text, 1) == ["--optim.lr", "0.1", "--run-name", "a b"]
    with pytest.raises(
        slurm.UserError, match=r"has 2 set\(s\) of overrides, so array task 2 has none; .*0-1"
    ):
        slurm.sweep_overrides(text, 2)
    shipped = (REPO / "sweeps" / "lr.txt").read_text()
    assert slurm.sweep_overrides(shipped, 3) == ["--optim.lr", "0.3"]


def _free_rendezvous_port() -> int:
    """A port of launcher.cluster.slurm's range that is free here now."""
    for port in random.Random().sample(range(slurm.PORT_BASE, slurm.PORT_BASE + slurm.PORT_SPAN), 100):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in launcher.cluster.slurm's rendezvous range")


@pytest.mark.slow
def test_nodes_with_different_process_counts_train_as_one_job(tmp_path: Path) -> None:
    """Two nodes' `launcher.cluster.slurm launch`, here on one machine, with the real accelerate and torchrun: with
    LAUNCHER_PROCS_PER_NODE=2,1 node 0 starts 2 ranks and node 1 one, and the three train as one job of 3."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _stub(stubs, "scontrol", 'printf "localhost\\nlocalhost\\n"\n')
    job = _free_rendezvous_port() - slurm.PORT_BASE + 7 * slurm.PORT_SPAN
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SLURMD_", "LAUNCHER_", "TORCH"))
        },
        "PATH": f"{stubs}:{VENV_BIN}:{os.environ['PATH']}",
        "SLURM_JOB_ID": str(job),
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "local[1-2]",
        "LAUNCHER_CPU": "1",
        "LAUNCHER_PROCS_PER_NODE": "2,1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "launcher.cluster.slurm", "launch", *RECIPE_ARGS, "--max-steps", "4"]
    logs = [tmp_path / f"node{node}.log" for node in (0, 1)]
    procs = []
    try:
        for node, log in enumerate(logs):
            with log.open("w") as out:
                node_env = {**env, "SLURM_NODEID": str(node)}
                procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=node_env, stdout=out, stderr=out))
        for proc in procs:
            proc.wait(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = [log.read_text() for log in logs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(t[-3000:] for t in text)
    assert "2 of 3 processes" in text[0] and "1 of 3 processes" in text[1]
    run_dir = tmp_path / "runs" / f"mnist-{job}"
    assert json.loads((run_dir / "env.json").read_text())["processes"] == 3
    (final,) = _records(run_dir / "metrics.jsonl", "final")
    assert final["step"] == 4


# ---- a real one-node SLURM cluster -------------------------------------------------------------------------------
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "scancel")


class Cluster:
    """slurmctld + slurmd for this machine, with a private slurm.conf, state and ports (a cluster of the
    machine's own, e.g. /work/shared/tools/slurm-cluster's, keeps running beside it). Client commands find it
    through SLURM_CONF in `env`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SLURMD_", "LAUNCHER_"))},
            "SLURM_CONF": str(self.conf),
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1",  # two processes share two cores
        }
        self.started_munged = False

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("timeout", 60)
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{cmd} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        memory_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 * 3 // 4
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"""ClusterName=launchertest
SlurmctldHost={host}
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ReturnToService=2
MpiDefault=none
NodeName={host} CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _start_munge(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return
        key = Path("/etc/munge/munge.key")
        if not key.is_file():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        for path in ("/etc/munge", "/run/munge", "/var/lib/munge", "/var/log/munge"):
            Path(path).mkdir(parents=True, exist_ok=True)
            shutil.chown(path, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        self.started_munged = True

    def start(self) -> None:
        self._write_conf()
        self._start_munge()
        self.run("slurmctld", "-f", str(self.conf))
        self.run("slurmd", "-f", str(self.conf))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.run("sinfo", "-h", "-t", "idle", "-o", "%D", check=False).stdout.strip() == "1":
                return
            time.sleep(0.5)
        logs = "".join(p.read_text()[-2000:] for p in (self.root / "log").glob("*.log"))
        raise AssertionError(f"the SLURM node did not come up:\n{logs}")

    def stop(self) -> None:
        self.run("scancel", "--user", "root", check=False)
        for name in ("slurmd", "slurmctld"):
            pid_file = self.root / f"{name}.pid"
            if pid_file.is_file():
                pid = int(pid_file.read_text())
                _kill_and_wait(pid)
        if self.started_munged:
            pid_file = Path("/run/munge/munged.pid")
            if pid_file.is_file():
                _kill_and_wait(int(pid_file.read_text()))

    def job_state(self, job: str) -> tuple[str, int]:
        """(JobState, Restarts) of a job."""
        out = self.run("scontrol", "show", "job", "--oneliner", job).stdout
        return re.search(r"JobState=(\S+)", out).group(1), int(re.search(r"Restarts=(\d+)", out).group(1))


def _kill_and_wait(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        reason = (
            f"SLURM is not installed (no {', '.join(missing)}): "
            "apt-get install slurmctld slurmd slurm-client munge"
        )
        print(f"\nskipping the SLURM cluster tests: {reason}")
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("starting a SLURM cluster (slurmd, munged) needs root")
    if not (MNIST_MINI / "MNIST" / "raw").is_dir():
        pytest.fail(f"the real-digit fixture {MNIST_MINI} is missing (it lives in ../shared beside the repo)")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _wait_for(what: str, condition: Callable[[], bool], timeout: float, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            jobs = cluster.run("squeue", check=False).stdout
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; squeue:\n{jobs}")
        time.sleep(0.2)


# The MNIST recipe on 2 gloo processes on CPU, briefly: one epoch is 62 steps, so a 60-step run stops mid-epoch.
RECIPE_ARGS = [
    str(REPO / "recipes" / "mnist.py"),
    "--data.root",
    str(MNIST_MINI),
    "--logging.every-steps",
    "5",
    "--logging.no-progress-bar",
    "--logging.trackers",
    "--preemption.check-every-steps",
    "2",
]
TRAIN_ARGS = [*RECIPE_ARGS, "--max-steps", "60", "--checkpoint.every-steps", "20"]
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=2", "--time=10"]


def _submit(cluster: Cluster, workdir: Path, *args: str, wait: bool = False) -> tuple[str, int]:
    """sbatch from `workdir` (logs/ and runs/ land there) with 2 CPU processes per node; (job id, exit status)."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    cluster.env.update(LAUNCHER_CPU="1", LAUNCHER_PROCS_PER_NODE="2")
    result = cluster.run("sbatch", "--parsable", *args, cwd=workdir, check=False, timeout=600)
    job = result.stdout.strip().split(";")[0]
    if not job:
        raise AssertionError(f"sbatch failed: {result.stderr}")
    return job, (_wait_until_done(cluster, job) if wait else result.returncode)


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _wait_until_done(cluster: Cluster, job: str, timeout: float = 600) -> int:
    """What `sbatch --wait` does (wait for every task of the job; the highest exit code), polling every 0.5 s:
    sbatch polls after 2, 10 and 42 s, so a 15-second job kept a test waiting 42 s."""
    deadline = time.monotonic() + timeout
    while True:
        out = cluster.run("scontrol", "show", "job", "--oneliner", job, check=False).stdout
        tasks = [
            (re.search(r"JobState=(\S+)", line), re.search(r"ExitCode=(\d+):", line))
            for line in out.splitlines()
        ]
        if tasks and all(state and code and state.group(1) in ENDED for state, code in tasks):
            return max(int(code.group(1)) for _, code in tasks)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for job {job}:\n{out}")
        time.sleep(0.5)


def _log(workdir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((workdir / "logs").glob("*.out")))


def _final_checkpoint(run_dir: Path) -> Path:
    latest = json.loads((run_dir / "checkpoints" / "latest").read_text())["checkpoint"]
    return run_dir / "checkpoints" / latest


def _records(path: Path, kind: str | None = None) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, int]:
    """One `sbatch --wait slurm/train.sbatch` run of TRAIN_ARGS: (work dir, job id, sbatch's exit status)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    job, status = _submit(
        slurm_cluster, workdir, *CPU_JOB, str(REPO / "slurm" / "train.sbatch"), *TRAIN_ARGS, wait=True
    )
    return workdir, job, status


@pytest.mark.slurm
def test_train_sbatch_completes_with_checkpoints_and_metrics(
    slurm_cluster: Cluster, uninterrupted: tuple[Path, str, int]
) -> None:
    workdir, job, status = uninterrupted
    log = _log(workdir)
    assert status == 0, log[-5000:]
    assert slurm_cluster.job_state(job) == ("COMPLETED", 0)
    run_dir = workdir / "runs" / f"mnist-{job}"  # named from the job id, so a requeued job finds it
    assert (_final_checkpoint(run_dir) / "model.safetensors").is_file()
    assert _final_checkpoint(run_dir).name == "step-00000060"
    (final,) = _records(run_dir / "metrics.jsonl", "final")
    assert final["step"] == 60 and final["accuracy"] > 0.5
    assert json.loads((run_dir / "env.json").read_text())["processes"] == 2
    assert "--num_processes 2" in log and "--machine_rank 0" in log
    assert not (run_dir / "requeues.jsonl").exists()


@pytest.mark.slurm
def test_usr1_saves_requeues_resumes_and_matches_the_uninterrupted_run(
    slurm_cluster: Cluster, uninterrupted: tuple[Path, str, int], tmp_path: Path
) -> None:
    reference_dir, reference_job, reference_status = uninterrupted
    assert reference_status == 0, _log(reference_dir)[-3000:]
    job, _ = _submit(slurm_cluster, tmp_path, *CPU_JOB, str(REPO / "slurm" / "train.sbatch"), *TRAIN_ARGS)
    run_dir = tmp_path / "runs" / f"mnist-{job}"
    metrics = run_dir / "metrics.jsonl"
    # Signal as soon as training runs (the first loss is logged at step 5), as SLURM does 90 s before the limit.
    _wait_for(
        "the first logged step", lambda: metrics.is_file() and _records(metrics, "train"), 180, slurm_cluster
    )
    slurm_cluster.run("scancel", "--signal=USR1", job)
    requeues = run_dir / "requeues.jsonl"
    _wait_for("the requeue", lambda: requeues.is_file() and requeues.read_text().strip(), 120, slurm_cluster)
    _wait_for(
        "the job to be pending again", lambda: slurm_cluster.job_state(job)[0] == "PENDING", 60, slurm_cluster
    )
    # SLURM holds a requeued job back for about two minutes (its begin time); start it now instead of waiting.
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    _wait_for(
        "the requeued job to finish",
        lambda: slurm_cluster.job_state(job)[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
        300,
        slurm_cluster,
    )
    log = _log(tmp_path)
    assert slurm_cluster.job_state(job) == ("COMPLETED", 1), log[-5000:]

    (record,) = _records(requeues)
    assert record["job"] == job and record["requeued"] and record["signal"] == "SIGUSR1"
    stopped = int(re.search(r"stopped by (?:a signal|SIGUSR1) at step (\d+)", log).group(1))
    assert 5 <= stopped < 60 and stopped == record["step"]
    assert re.search(rf"resumed from \S*/step-{stopped:08d} at step {stopped} ", log), log[-5000:]
    (final,) = _records(metrics, "final")
    assert final["step"] == 60

    resumed = _final_checkpoint(run_dir) / "model.safetensors"
    reference = _final_checkpoint(reference_dir / "runs" / f"mnist-{reference_job}") / "model.safetensors"
    # Tensor by tensor, exactly: the files' headers may order their metadata differently.
    resumed_weights, reference_weights = load_file(resumed), load_file(reference)
    assert resumed_weights.keys() == reference_weights.keys()
    differ = [k for k in reference_weights if not torch.equal(resumed_weights[k], reference_weights[k])]
    assert not differ, f"weights after the requeue differ from the uninterrupted run: {differ}"


@pytest.mark.slurm
def test_sweep_array_runs_every_line_and_sweep_summary_reports_them(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    sweep = tmp_path / "lr.txt"
    # Two lines (with a comment and a blank line to skip): both tasks run at once on the two cores.
    sweep.write_text("# two learning rates\n--optim.lr 0.01\n\n--optim.lr 0.1\n")
    job, status = _submit(
        slurm_cluster,
        tmp_path,
        "--array=0-1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",  # two single-process tasks at a time on the two cores
        "--time=10",
        str(REPO / "slurm" / "sweep.sbatch"),
        RECIPE_ARGS[0],
        str(sweep),
        *RECIPE_ARGS[1:],
        "--max-steps",
        "10",
        wait=True,
    )
    log = _log(tmp_path)
    assert status == 0, log[-5000:]
    sweep_dir = tmp_path / "runs" / f"sweep-{job}"
    runs = sorted(p.name for p in sweep_dir.iterdir())
    assert runs == [f"mnist-{job}_{task}" for task in range(2)]
    for task, lr in enumerate([0.01, 0.1]):
        config = json.loads((sweep_dir / f"mnist-{job}_{task}" / "config.json").read_text())
        assert config["optim"]["lr"] == lr

    out = subprocess.run(
        [sys.executable, "-m", "launcher.tools.cli", "sweep-summary", str(sweep_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "optim.lr", "step"]
    rows = [line.split() for line in lines[2:4]]
    assert sorted(row[0] for row in rows) == [f"mnist-{job}_{task}" for task in range(2)]
    assert sorted(float(row[1]) for row in rows) == [0.01, 0.1]
    assert all(row[2] == "10" and row[-1] == "done" for row in rows)
    best = [float(row[lines[0].split().index("best_accuracy")]) for row in rows]
    assert best == sorted(best, reverse=True)
    assert "2 run(s), sorted by best_accuracy, largest first" in out.stdout
