"""A chaos soak on the local SLURM cluster: a CKD job on two of its three namespace nodes, streaming its shards from a
server, with faults injected from a seed at chosen steps: a rank SIGKILLed, a node crashed (every process of it
killed, its slurmd too), a node's link down for longer than the peer time-out and for shorter, a pre-emption signal
(USR2), a shard served cut part-way once. Every fault must end in automatic recovery -- the job requeued and
resumed, or the run going on -- with nothing lost: at the end the job is COMPLETED and its weights and sample logs
equal an uninterrupted run's. Prints a table: faults by kind, recovered, the seconds from each fault to training
again; writes it to OUT/soak.json.

    bash slurm/local-cluster.sh start --nodes 3          # as root: the namespace nodes, as CI starts them
    python tests/soak.py --minutes 30 --seed 1 --out runs/soak

`tests/test_soak.py` runs it for a few minutes in CI. The faults come about every 40 s (a requeue costs ~30 s on the
test cluster); the job's steps wait DISCO_STEP_PAUSE s each, so that a fault lands at the step chosen.
"""

import argparse
import datetime
import json
import platform
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest, slurm_jobs and shard_server beside it

from conftest import REPO, assert_same_weights, build_tiny_run_inputs, start_cluster  # noqa: E402
from shard_server import ShardServer  # noqa: E402
from slurm_jobs import PLACEMENTS, job_history, job_state, job_story, node_lost, node_pids, sbatch, submit  # noqa: E402

FAULTS = ("rank_killed", "node_crashed", "link_down_long", "link_down_short", "preempted", "shard_cut")
ENDS_THE_RUN = {"rank_killed", "node_crashed", "link_down_long", "preempted"}  # the others: the run goes on
STEP_PAUSE = 0.2  # s a step waits (DISCO_STEP_PAUSE)
PEER_TIMEOUT = 8  # DISCO_PEER_TIMEOUT: the test cluster's SLURM finds a dead node after ~18 s
SHORT_LINK_DOWN = 3.0  # s: shorter than the peer time-out and SLURM's 10 s node time-out
SECONDS_PER_FAULT = 40
BRIDGE = "10.77.0.1"  # the root side of the nodes' bridge: the shard server listens there
SENTENCES, SHARD_SIZE = 1600, 50  # 32 shards; 100 steps an epoch at 8 sentences a rank on two ranks
GROUP = re.compile(r"process group: 2 ranks on \d host\(s\) \((.*)\); rendezvous")


def plan(minutes: float, seed: int) -> tuple:
    """([(fault kind, step)], steps of the job): every kind once in a shuffled order, then kinds drawn at random;
    8-24 steps apart."""
    rng = random.Random(seed)
    kinds = list(FAULTS)
    rng.shuffle(kinds)
    count = max(len(FAULTS), round(minutes * 60 / SECONDS_PER_FAULT))
    kinds += [rng.choice(FAULTS) for _ in range(count - len(FAULTS))]
    faults, step = [], 0
    for kind in kinds:
        step += rng.randint(8, 24)
        faults.append((kind, step))
    # the run goes on while a fault that does not end it is dealt with (up to ~7 s, ~30 steps): room for that
    goes_on = sum(kind not in ENDS_THE_RUN for kind in kinds)
    return faults, step + 30 * goes_on + 16, rng


def job_args(steps: int) -> list:
    epochs = steps // 100 + 1
    args = ["--epochs", str(epochs), "--max-steps", str(steps), "--batch-size", "8", "--queue-size", "64"]
    return args + ["--log-every", "1", "--head-init", "random", "--checkpoint-every", "4", "--sample-log"]


class Log:
    """The job's log in its run folder (RUN_DIR/slurm-<job>.log): its newest step, its resumes, its ranks' nodes."""

    def __init__(self, path: Path):
        self.path = path

    def text(self) -> str:
        return self.path.read_text(errors="replace") if self.path.exists() else ""

    def step(self, text: str | None = None) -> int:
        steps = re.findall(r"^step (\d+)/", text if text is not None else self.text(), re.M)
        return int(steps[-1]) if steps else 0

    def resumes(self, text: str | None = None) -> int:
        return (text if text is not None else self.text()).count("resumed from ")

    def nodes(self) -> list:
        """The nodes of the newest run's ranks, rank 0's first."""
        groups = GROUP.findall(self.text())
        return [part.split(":")[0] for part in groups[-1].split("; ")] if groups else []

    def training_after(self, marker: str, text: str) -> bool:
        """A step line after the last `marker` in `text`."""
        at = text.rfind(marker)
        return at >= 0 and re.search(r"^step \d+/", text[at:], re.M) is not None


def wait(what: str, done, seconds: float, job: str, env: dict, log: Log) -> None:
    deadline = time.time() + seconds
    while not done():
        if time.time() > deadline:
            raise AssertionError(
                f"soak: {what} did not happen within {seconds:.0f} s\n{job_story(job, env)}{log.text()[-3000:]}"
            )
        time.sleep(0.1)


def distill_pids(node: str) -> list:
    """The processes of the rank on `node` (the launcher and any worker it forked)."""
    pids = []
    for pid in node_pids(node):
        try:
            if b"launchers/distill.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


def inject(kind: str, rng: random.Random, job: str, env: dict, log: Log, server, restoring: list) -> str:
    """Start fault `kind`; what it hit. A lost node comes back once the job left RUNNING, in a thread that
    `restoring` gets."""
    nodes = log.nodes()
    node = rng.choice(nodes)
    if kind == "rank_killed":
        pids = distill_pids(node)
        subprocess.run(["kill", "-9", *pids], check=True)
        return f"rank {nodes.index(node)} on {node}"
    if kind in ("node_crashed", "link_down_long"):  # the node comes back while the job recovers: not waited for

        def lose_then_restore():
            with node_lost(node, "crashed" if kind == "node_crashed" else "silent", env) as lost_at:
                wait("the job leaving RUNNING", lambda: job_state(job, env) != "RUNNING", 120, job, env, log)
                print(f"  {kind} {node}: the run left RUNNING {time.time() - lost_at:.1f} s later", flush=True)

        restoring.append(threading.Thread(target=lose_then_restore))
        restoring[-1].start()
        return node
    if kind == "link_down_short":
        link = "disco-v" + node.removeprefix("disco-n")
        subprocess.run(["ip", "link", "set", link, "down"], check=True)
        time.sleep(SHORT_LINK_DOWN)
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
        return f"{node} for {SHORT_LINK_DOWN:.0f} s"
    if kind == "preempted":
        subprocess.run(["scancel", "--signal=USR2", job], env=env, check=True)
        return "the job's ranks"
    server.cut_the_next_shard()
    return "the next shard read"


def soak(minutes: float, seed: int, out: Path) -> dict:
    env = start_cluster()
    faults, steps, rng = plan(minutes, seed)
    out.mkdir(parents=True, exist_ok=True)
    inputs = out / "inputs"
    if not (inputs / "shards" / "index.json").exists():
        sentences = [f"the {i} dog plays in the park with {i % 7} children and {i % 13} cats" for i in range(SENTENCES)]
        build_tiny_run_inputs(inputs, sentences, shard_size=SHARD_SIZE)
    args = job_args(steps)
    with ShardServer(inputs, host=BRIDGE) as server:
        base = {**env, "SHARDS": f"{server.url}/shards", "STUDENT": str(inputs / "student"), "KEEP_LAYERS": ""}
        base.update(TEACHER=str(inputs / "teacher"), DISCO_STEP_PAUSE=str(STEP_PAUSE), DISCO_MAX_RESTARTS="1000")
        base.update(DISCO_PEER_TIMEOUT=str(PEER_TIMEOUT))

        reference = out / "uninterrupted"
        print(f"soak: {len(faults)} faults over {steps} steps (seed {seed}); the uninterrupted run first", flush=True)
        started = time.time()
        sbatch(
            "ckd.sbatch",
            PLACEMENTS["two-nodes"],
            {**base, "RUN_DIR": str(reference)},
            out / "uninterrupted.out",
            *args,
            timeout=1800,
        )
        uninterrupted_s = time.time() - started

        run = out / "soaked"
        started = time.time()
        job = submit("ckd.sbatch", {**base, "RUN_DIR": str(run)}, out / "soaked.out", *args)
        log = Log(run / f"slurm-{job}.log")
        rows = []
        for kind, at in faults:
            at = max(at, log.step() + 4)  # the run went on while the previous fault was dealt with
            if at > steps - 10:  # the job would end first: recorded as not injected
                rows.append({"kind": kind, "step": at, "hit": "-", "recovered": None, "seconds": None})
                continue
            wait(f"step {at}", lambda at=at: log.step() >= at and job_state(job, env) == "RUNNING", 600, job, env, log)
            before = log.text()
            fault_at = time.time()
            restoring = []
            hit = inject(kind, rng, job, env, log, server, restoring)
            if kind in ENDS_THE_RUN:  # requeued, resumed, training again

                def again(before=before):
                    text = log.text()
                    return log.resumes(text) > log.resumes(before) and log.training_after("resumed from ", text)
            elif kind == "shard_cut":  # the reader retried the shard, and training went on

                def again(before=before):
                    text = log.text()
                    return text.count("warning: reading ") > before.count("warning: reading ") and log.training_after(
                        "warning: reading ", text
                    )
            else:  # the link came back before anyone gave up: steps go on, no restart

                def again(before=before, at=log.step()):
                    return log.step() > at + 1

            wait(f"recovery from {kind} at step {at}", again, 600, job, env, log)
            restarted = log.resumes() > log.resumes(before)
            seconds = time.time() - fault_at
            for thread in restoring:  # the node is back before the next fault
                thread.join()
            row = {"kind": kind, "step": at, "hit": hit, "recovered": True, "seconds": round(seconds, 1)}
            row["requeued"] = restarted
            if kind == "shard_cut":
                row["hit"] = server.cut_log[-1] if server.cut_log else hit
            rows.append(row)
            print(
                f"  step {at:4d}  {kind:16s} {row['hit']:28s} training again after {seconds:5.1f} s"
                f"{' (requeued)' if restarted else ''}",
                flush=True,
            )
        wait("the job's end", lambda: not job_state(job, env), 900, job, env, log)
        states = job_history(job, env, within=60)
        soaked_s = time.time() - started

    from safetensors.torch import load_file

    from disco_dist.train.metrics import read_sample_logs

    assert states[-1] == "COMPLETED", f"{states}\n{job_story(job, env)}{log.text()[-3000:]}"
    for kind in ENDS_THE_RUN | {"link_down_short"}:
        unexpected = [r for r in rows if r["kind"] == kind and r.get("requeued") != (kind in ENDS_THE_RUN)]
        assert not unexpected, unexpected  # ended runs came back by a requeue; a short link loss ended nothing
    assert_same_weights(
        load_file(run / "ckd" / "final" / "model.safetensors"),
        load_file(reference / "ckd" / "final" / "model.safetensors"),
    )
    assert read_sample_logs(run / "ckd") == read_sample_logs(reference / "ckd")
    result = {
        "seed": seed,
        "minutes": minutes,
        "steps": steps,
        "job": job,
        "runs": len(states),
        "states": states,
        "uninterrupted_s": round(uninterrupted_s, 1),
        "soaked_s": round(soaked_s, 1),
        "faults": rows,
        "weights_equal": True,
        "sample_logs_equal": True,
        "cpu": cpu_model(),
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
    }
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return result


def table(result: dict) -> str:
    lines = [
        f"soak: seed {result['seed']}, {result['steps']} steps, {result['soaked_s'] / 60:.1f} min "
        f"(uninterrupted: {result['uninterrupted_s']:.0f} s); {result['cpu']}, commit {result['commit']}",
        "| fault | injected | recovered | fault to training again, mean / max (s) |",
        "|---|---|---|---|",
    ]
    for kind in FAULTS:
        rows = [r for r in result["faults"] if r["kind"] == kind]
        done = [r["seconds"] for r in rows if r["recovered"]]
        timing = f"{sum(done) / len(done):.1f} / {max(done):.1f}" if done else "-"
        untried = sum(r["recovered"] is None for r in rows)
        note = f" ({untried} more not: the job was ending)" if untried else ""
        lines.append(f"| {kind} | {len(rows) - untried}{note} | {len(done)} | {timing} |")
    lines.append(
        f"job {result['job']}: {result['runs']} runs, {' '.join(result['states'][-1:])}; weights and sample "
        "logs equal the uninterrupted run's"
    )
    return "\n".join(lines)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="about how long the faults go on")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "soak")
    args = parser.parse_args()
    soak(args.minutes, args.seed, args.out)


if __name__ == "__main__":
    main()
