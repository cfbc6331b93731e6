"""Driving the local SLURM cluster's jobs and nodes from a test or the soak (tests/soak.py): submit a job on two of
the namespace nodes, read its state and history, lose a node (crashed or silent) and bring it back."""

import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from conftest import REPO, TEST_NODES

CLUSTER = REPO / "slurm" / "local-cluster.sh"

PLACEMENTS = {
    "two-nodes": ["--partition", "multi", "--nodes=2", "--ntasks-per-node=1"],
    "one-node": ["--nodes=1", "--ntasks-per-node=2"],
}


def node_pids(node: str) -> list:
    return subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout.split()


def job_state(job, env) -> str:
    """The job's state in squeue, "" once it has left the queue (retried while the controller is busy)."""
    for _ in range(20):
        result = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, env=env)
        if result.returncode == 0:
            return result.stdout.strip()
        time.sleep(0.5)
    raise AssertionError(f"squeue failed: {result.stderr}")


def queue_and_nodes(job, env) -> str:
    """What a stuck job's failure message shows: the job's state and reason, and the nodes' states and reasons."""
    commands = (["squeue", "-h", "-j", job, "-o", "job %i %T %r"], ["sinfo", "-h", "-N", "-o", "%N %T %E"])
    return "".join(subprocess.run(c, capture_output=True, text=True, env=env).stdout for c in commands)


def job_story(job, env) -> str:
    """What a failed requeue's message shows: sacct's record of each run (state, exit code, nodes, times) and the
    controller's and nodes' log lines about the job."""
    record = subprocess.run(
        ["sacct", "-D", "-j", job, "-X", "-n", "-P", "-o", "State,ExitCode,NodeList,Start,End"],
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    logs = Path(env["SLURM_CONF"]).parent.parent / "log"
    mentions = re.compile(rf"JobId={job}\b|\[{job}\.|StepId={job}\.|JOB {job} ")
    lines = [
        f"{path.name}: {line}"
        for path in sorted(logs.glob("slurm*.log"))
        for line in path.read_text(errors="replace").splitlines()
        if mentions.search(line)
    ]
    return "sacct:\n" + record + "\n".join(lines[-60:]) + "\n"


def job_history(job, env, within: float) -> list:
    """sacct's states of every run of the job (-D), once the last one has ended (accounting lags the queue)."""
    deadline = time.time() + within
    while True:
        states = subprocess.run(
            ["sacct", "-D", "-j", job, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True, env=env
        ).stdout.split()
        if states and states[-1] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING"):
            return states
        assert time.time() < deadline, states
        time.sleep(1)


@contextmanager
def node_lost(node: str, how: str, cluster: dict):
    """Lose `node` inside the block, crashed (every process of the node killed: its slurmd, the job's steps) or silent
    (its link taken down: nothing answers, nothing is closed); the time it was lost. On leaving, the node comes
    back: its link, its slurmd (the start waits up to 90 s for the nodes), its state."""
    link = "disco-v" + node.removeprefix("disco-n")
    lost_at = time.time()
    try:
        if how == "crashed":
            subprocess.run(["kill", "-9", *node_pids(node)], check=True)
        else:
            subprocess.run(["ip", "link", "set", link, "down"], check=True)
        yield lost_at
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
        back = subprocess.run(
            ["bash", str(CLUSTER), "start", "--nodes", str(TEST_NODES)], capture_output=True, text=True, timeout=240
        )
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], env=cluster, capture_output=True)
        assert back.returncode == 0, f"the node's restart failed: {back.stderr}"


def seconds_until_it_leaves_running(job: str, lost_at: float, log: Path, cluster: dict) -> float:
    """Wait for `job` to leave RUNNING after a node was lost (at most 120 s); the seconds since the loss."""
    while job_state(job, cluster) == "RUNNING":
        assert time.time() - lost_at < 120, log.read_text()[-3000:]
        time.sleep(0.5)
    return time.time() - lost_at


def requeued_to_completion(job: str, lost_at: float, log: Path, cluster: dict) -> str:
    """Wait for the requeued `job` to run again and end (at most 300 s after the loss); assert that sacct shows it
    COMPLETED after an earlier run; its log."""
    while job_state(job, cluster):  # requeued by SLURM (pending), then running again
        assert time.time() - lost_at < 300, queue_and_nodes(job, cluster) + log.read_text()[-3000:]
        time.sleep(1)
    states = job_history(job, cluster, within=60)
    text = log.read_text()
    assert states[-1] == "COMPLETED" and len(states) >= 2, f"{states}\n{job_story(job, cluster)}{text[-4000:]}"
    return text


def submit(script: str, env: dict, log: Path, *args) -> str:
    """sbatch `script` on two nodes without waiting; the job id."""
    cmd = ["sbatch", "--parsable", *PLACEMENTS["two-nodes"], "--output", str(log), str(REPO / "slurm" / script)]
    result = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def sbatch(script, placement, env, log, *args, timeout=600):
    """sbatch `script` and wait for it; its log (asserting it ended well)."""
    result = subprocess.run(
        ["sbatch", "--parsable", "--wait", *placement, "--output", str(log), str(REPO / "slurm" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )
    text = log.read_text() if log.exists() else ""
    assert result.returncode == 0, text[-3000:] + result.stderr
    return text


def job_nodes(job, env) -> str:
    """The nodes of the job's last run, as sacct writes them (disco-n[2-3])."""
    runs = subprocess.run(
        ["sacct", "-D", "-j", job, "-X", "-n", "-P", "-o", "NodeList"], capture_output=True, text=True, env=env
    )
    return runs.stdout.split()[-1]
