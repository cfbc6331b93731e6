"""Across two SLURM nodes: the local cluster's namespace nodes (slurm/local-cluster.sh start --nodes 3: each node its
own network stack, hostname and address on a bridge), one rank per node, against the same job on one node; and the
nodes lost under a running job."""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, assert_same_weights, build_tiny_run_inputs, scalars, start_cluster
from slurm_jobs import (
    PLACEMENTS,
    job_history,
    job_nodes,
    job_state,
    node_lost,
    queue_and_nodes,
    requeued_to_completion,
    sbatch,
    seconds_until_it_leaves_running,
    submit,
)


@pytest.fixture(scope="module")
def cluster():
    env = start_cluster()
    nodes = subprocess.run(["sinfo", "-h", "-N", "-p", "multi", "-o", "%N %T"], capture_output=True, text=True, env=env)
    assert nodes.stdout.split() == ["disco-n1", "idle", "disco-n2", "idle", "disco-n3", "idle"], nodes.stdout
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    sentences = [f"the {i} dog plays in the park with {i % 7} children" for i in range(400)]
    return build_tiny_run_inputs(tmp_path_factory.mktemp("multinode"), sentences, shard_size=50)


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "model.safetensors")


GROUP = re.compile(r"process group: 2 ranks on (\d) host\(s\) \((.*)\); rendezvous (\S+) \((\S+)\)")


def assert_across_nodes(log: str) -> None:
    """The job's ranks ran one on each node, and met at the first node's bridge address, not a loopback one."""
    group = GROUP.search(log)
    assert group and group[1] == "2" and group[2] == "disco-n1: ranks 0; disco-n2: ranks 1", group and group[0]
    assert group[3] == "disco-n1" and group[4] == "10.77.0.11", group[0]


def assert_same_training(across, alone, loss) -> None:
    assert scalars(across)[loss] == pytest.approx(scalars(alone)[loss], abs=1e-6)
    assert_same_weights(final_weights(across), final_weights(alone))


@pytest.mark.slow
def test_each_stage_with_one_rank_on_each_of_two_nodes_equals_two_ranks_on_one(cluster, tiny, tmp_path):
    """ckd.sbatch, finetune.sbatch and cache_teacher.sbatch (the ZeRO-3 teacher partitioned over the two nodes),
    each run with one rank per node and with both ranks on one node: the same losses, weights and cache bytes."""
    from disco_dist.data.shards import iter_shard_samples, read_index

    root, student, teacher, _ = tiny
    env = {**cluster, "SHARDS": str(root / "shards"), "STUDENT": str(student), "TEACHER": str(teacher)}
    env["KEEP_LAYERS"] = ""
    distill = ["--max-steps", "8", "--batch-size", "8", "--queue-size", "64", "--log-every", "2"]
    finetune = ["--max-steps", "4", "--batch-size", "4", "--max-triplets", "64", "--eval-every", "2"]
    for name, placement in PLACEMENTS.items():
        run = tmp_path / name
        log = sbatch(
            "ckd.sbatch",
            placement,
            {**env, "RUN_DIR": str(run)},
            run.with_suffix(".ckd.log"),
            *distill,
            "--head-init",
            "random",
        )
        assert "finished: 8 steps" in log, log[-3000:]
        if name == "two-nodes":
            assert_across_nodes(log)
        stage2 = {**env, "STUDENT": str(run / "ckd" / "final"), "RUN_DIR": str(run / "ft")}
        log = sbatch("finetune.sbatch", placement, stage2, run.with_suffix(".ft.log"), *finetune, "--log-every", "2")
        assert "finished: 4 steps" in log, log[-3000:]
        cache = {**env, "OUT": str(run / "cached")}
        log = sbatch(
            "cache_teacher.sbatch", placement, cache, run.with_suffix(".cache.log"), "--teacher-batch-size", "16"
        )
        assert "wrote 400 sentences with teacher embeddings" in log, log[-3000:]
        if name == "two-nodes":
            assert_across_nodes(log)
    across, alone = tmp_path / "two-nodes", tmp_path / "one-node"
    assert_same_training(across / "ckd", alone / "ckd", "loss/ckd")
    assert_same_training(across / "ft", alone / "ft", "loss/sup_contrastive")
    cached = [list(iter_shard_samples(read_index(run / "cached"), with_keys=True)) for run in (across, alone)]
    assert [(k, t, e.tobytes()) for k, t, e in cached[0]] == [(k, t, e.tobytes()) for k, t, e in cached[1]]


@pytest.mark.slow
def test_the_submitit_pipeline_runs_across_both_nodes(cluster, tiny, tmp_path):
    """`submit.py --nodes 2 --tasks-per-node 1 --partition multi`: shards -> teacher cache -> distill -> fine-tune ->
    evaluate, the training jobs with a rank on each node, every job COMPLETED in sacct."""
    from test_slurm import sacct_state, submit, tiny_pipeline_args

    root, student, teacher, corpus = tiny
    run_dir = tmp_path / "pipeline"
    args = [*tiny_pipeline_args(root, student, teacher, corpus, run_dir), "--nodes", 2, "--tasks-per-node", 1]
    result = submit([*args, "--partition", "multi"], cluster)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = {line.split()[1]: line.split()[-1] for line in result.stdout.splitlines() if line.startswith("submitted")}
    assert list(jobs) == ["shards", "cache", "distill", "finetune", "evaluate"]
    assert [sacct_state(j, cluster) for j in jobs.values()] == ["COMPLETED"] * 5
    for stage in ("cache", "distill", "finetune"):
        nodes = subprocess.run(
            ["sacct", "-j", jobs[stage], "-X", "-n", "-P", "-o", "NodeList"],
            capture_output=True,
            text=True,
            env=cluster,
        ).stdout.strip()
        assert nodes == "disco-n[1-2]", (stage, nodes)
    logs = "".join(p.read_text() for p in sorted(run_dir.glob("submitit/*/*.out")))
    assert logs.count("process group: 2 ranks on 2 host(s) (disco-n1: ranks 0; disco-n2: ranks 1)") >= 3, logs[-3000:]
    assert "avg" in json.loads((run_dir / "eval_sts.json").read_text())["scores"]


@pytest.mark.slow
def test_a_job_signalled_to_stop_checkpoints_requeues_itself_and_finishes_as_if_uninterrupted(cluster, tiny, tmp_path):
    """Pre-emption on real SLURM, across both nodes: `scancel --signal=USR2` (what `--signal=USR2@T` sends before the
    time limit) -> the ranks checkpoint at a step boundary, rank 0 runs `scontrol requeue`, the job comes back under
    the same id (sacct: REQUEUED, then COMPLETED), resumes and ends with the uninterrupted run's weights; the sample
    logs show every batch trained exactly once."""
    from disco_dist.train.metrics import read_sample_logs

    root, student, teacher, _ = tiny
    env = {**cluster, "SHARDS": str(root / "shards"), "STUDENT": str(student), "TEACHER": str(teacher)}
    env["KEEP_LAYERS"] = ""
    args = ["--epochs", "3", "--batch-size", "8", "--queue-size", "64", "--log-every", "2", "--head-init", "random"]
    args += ["--checkpoint-every", "0", "--sample-log"]
    placement = PLACEMENTS["two-nodes"]
    reference = tmp_path / "uninterrupted"
    sbatch("ckd.sbatch", placement, {**env, "RUN_DIR": str(reference)}, tmp_path / "reference.log", *args)

    run = tmp_path / "requeued"
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            *placement,
            "--output",
            str(tmp_path / "requeued.log"),
            str(REPO / "slurm" / "ckd.sbatch"),
            *args,
        ],
        capture_output=True,
        text=True,
        env={**env, "RUN_DIR": str(run)},
        cwd=REPO,
        timeout=60,
    )
    job = submitted.stdout.strip().split(";")[0]
    assert submitted.returncode == 0 and job, submitted.stderr
    log = run / f"slurm-{job}.log"
    deadline = time.time() + 240
    while not (log.exists() and "step 6/" in log.read_text()):
        assert time.time() < deadline, log.read_text()[-3000:] if log.exists() else queue_and_nodes(job, cluster)
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job], env=cluster, check=True)
    while job_state(job, cluster):
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    text = log.read_text()
    stopped = re.search(r"stopped at step (\d+) on a pre-emption signal", text)
    assert stopped and f"requeued SLURM job {job}" in text, text[-3000:]
    assert f"resumed from {run / 'ckd' / 'checkpoints'}/step-{int(stopped[1]):08d} at step {stopped[1]}" in text
    states = job_history(job, cluster, within=60)
    assert states == ["REQUEUED", "COMPLETED"], states
    assert_same_weights(final_weights(run / "ckd"), final_weights(reference / "ckd"))
    assert read_sample_logs(run / "ckd") == read_sample_logs(reference / "ckd")


LOSS_ARGS = ["--epochs", "2", "--batch-size", "8", "--queue-size", "64", "--log-every", "2", "--head-init", "random"]
LOSS_ARGS += ["--checkpoint-every", "4", "--sample-log"]


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny, tmp_path_factory):
    root, student, teacher, _ = tiny
    run = tmp_path_factory.mktemp("uninterrupted")
    env = {**cluster, "SHARDS": str(root / "shards"), "STUDENT": str(student), "TEACHER": str(teacher)}
    sbatch(
        "ckd.sbatch",
        PLACEMENTS["two-nodes"],
        {**env, "KEEP_LAYERS": "", "RUN_DIR": str(run)},
        run / "job.log",
        *LOSS_ARGS,
    )
    return run / "ckd"


def lost_in_one_line(text: str, rank: int, lost: str, then: str) -> str:
    """The one error line of `rank` in `text`, naming the `lost` rank and node and ending with what to do `then`."""
    lines = [line for line in text.splitlines() if f"error: rank {rank}:" in line]
    assert len(lines) == 1 and lost in lines[0], text[-3000:]
    assert then in lines[0], lines[0]
    return lines[0]


def submitted_to_step_12(env: dict, run: Path, tmp_path: Path, cluster: dict) -> tuple:
    """The CKD job of LOSS_ARGS on two nodes, once it is at step 12 of 50 (its last checkpoint: step 12); (its id,
    its log). First every node is put back in service: one back from an earlier test's loss can be drained since
    (slurm/local-cluster.sh, "Kill task failed"), and the job must start on disco-n1 and disco-n2."""
    start_cluster()
    job = submit("ckd.sbatch", env, tmp_path / "job.log", *LOSS_ARGS)
    log = run / f"slurm-{job}.log"
    deadline = time.time() + 240
    while not (log.exists() and "step 12/" in log.read_text()):
        assert time.time() < deadline, log.read_text()[-3000:] if log.exists() else queue_and_nodes(job, cluster)
        time.sleep(0.2)
    return job, log


@pytest.mark.slow
@pytest.mark.parametrize("how", ["crashed", "silent"])
def test_a_node_lost_mid_run_ends_the_run_fast_and_the_requeued_job_finishes_as_if_uninterrupted(
    how, cluster, tiny, uninterrupted, tmp_path
):
    """Node disco-n2 lost mid-run, the two ways a node is lost: crashed (every process of the node killed) or
    silent (its link taken down: nothing answers). The running job ends within 60 s with one line naming the lost
    rank and node and the last complete checkpoint; SLURM requeues it (ckd.sbatch has --requeue), the same job
    resumes and ends with the uninterrupted run's weights (1e-5), every batch trained exactly once (sample logs)."""
    from disco_dist.train.metrics import read_sample_logs

    root, student, teacher, _ = tiny
    run = tmp_path / "run"
    env = {**cluster, "SHARDS": str(root / "shards"), "STUDENT": str(student), "TEACHER": str(teacher)}
    # heartbeats give up after 8 s here: the test cluster's SlurmdTimeout is 10 s (a real one's default is 300 s,
    # against DISCO_PEER_TIMEOUT's default of 20 s)
    env.update(KEEP_LAYERS="", RUN_DIR=str(run), DISCO_PEER_TIMEOUT="8")
    job, log = submitted_to_step_12(env, run, tmp_path, cluster)
    with node_lost("disco-n2", how, cluster) as lost_at:
        ended_after = seconds_until_it_leaves_running(job, lost_at, log, cluster)
        lost = log.read_text()
    print(f"{how}: the run ended {ended_after:.1f} s after the node was lost")
    assert ended_after < 60, lost[-3000:]
    checkpoint = f"the last complete checkpoint is {run / 'ckd' / 'checkpoints'}/step-"
    lost_in_one_line(lost, 0, "rank 1 on disco-n2", checkpoint)
    text = requeued_to_completion(job, lost_at, log, cluster)
    assert "resumed from" in text and "finished: 50 steps" in text, text[-3000:]
    assert_same_weights(final_weights(run / "ckd"), final_weights(uninterrupted))
    assert read_sample_logs(run / "ckd") == read_sample_logs(uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["crashed", "silent"])
def test_the_first_node_lost_mid_run_is_named_by_the_other_rank_and_the_job_finishes_on_the_nodes_that_are_up(
    how, cluster, tiny, uninterrupted, tmp_path
):
    """Node disco-n1 lost mid-run, crashed or silent: the job's first node, where rank 0, the rendezvous store, srun
    and the batch script live. The job leaves RUNNING within 60 s. Rank 1 on disco-n2 names rank 0 on disco-n1 in
    one line, kept in the job's errors file (its printed output went through srun on the lost node); SLURM requeues
    the job onto the nodes that are up (disco-n2 and disco-n3, disco-n1 still down), its new run prints the first
    run's line, resumes from the last complete checkpoint and ends with the uninterrupted run's weights (1e-5),
    every batch trained exactly once (sample logs)."""
    from disco_dist.train.metrics import read_sample_logs

    root, student, teacher, _ = tiny
    run = tmp_path / "run"
    env = {**cluster, "SHARDS": str(root / "shards"), "STUDENT": str(student), "TEACHER": str(teacher)}
    env.update(KEEP_LAYERS="", RUN_DIR=str(run), DISCO_PEER_TIMEOUT="8")
    job, log = submitted_to_step_12(env, run, tmp_path, cluster)
    with node_lost("disco-n1", how, cluster) as lost_at:
        ended_after = seconds_until_it_leaves_running(job, lost_at, log, cluster)
        text = requeued_to_completion(job, lost_at, log, cluster)  # while disco-n1 is down
        resumed_after = time.time() - lost_at
    print(
        f"{how} first node: the run ended {ended_after:.1f} s after the loss, the requeued job finished after "
        f"{resumed_after:.1f} s"
    )
    assert ended_after < 60, text[-3000:]
    errors = (run / f"slurm-{job}.errors").read_text()
    checkpoint = f"the last complete checkpoint is {run / 'ckd' / 'checkpoints'}/step-"
    line = lost_in_one_line(errors, 1, "rank 0 on disco-n1", checkpoint)
    assert line.split()[1:4] == ["disco-n2", "exit", "75:"], errors  # nothing to fix: the same command goes on
    assert line in text, text[-3000:]  # the requeued run printed it at its start
    assert job_nodes(job, cluster) == "disco-n[2-3]"
    assert "resumed from" in text and "finished: 50 steps" in text, text[-3000:]
    assert_same_weights(final_weights(run / "ckd"), final_weights(uninterrupted))
    assert read_sample_logs(run / "ckd") == read_sample_logs(uninterrupted)


CACHE_ARGS = ["--sort-group", "50"]  # a group is one shard of 50 sentences: 4 groups a rank


@pytest.fixture(scope="module")
def whole_cache(cluster, tiny, tmp_path_factory):
    root, _student, teacher, _ = tiny
    out = tmp_path_factory.mktemp("whole-cache") / "shards-teacher"
    env = {**cluster, "SHARDS": str(root / "shards"), "TEACHER": str(teacher), "OUT": str(out)}
    sbatch("cache_teacher.sbatch", PLACEMENTS["two-nodes"], env, out.parent / "job.log", *CACHE_ARGS)
    return out


def shard_bytes(folder: Path) -> dict:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("shard-*.tar"))}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["crashed", "silent"])
def test_a_node_lost_mid_cache_pass_ends_it_fast_and_the_requeued_pass_continues_to_the_same_shards(
    how, cluster, tiny, whole_cache, tmp_path
):
    """The teacher-cache pass, the job that costs the most GPU hours, watched as training is: disco-n2 lost
    (crashed or silent) between two groups of shards ends the pass within 60 s with one line naming rank 1 on
    disco-n2 and what is kept; SLURM requeues the job, which keeps the finished shards, embeds the rest, and ends
    with shards byte-identical to an uninterrupted pass's."""
    root, _student, teacher, _ = tiny
    out = tmp_path / "shards-teacher"
    env = {**cluster, "SHARDS": str(root / "shards"), "TEACHER": str(teacher), "OUT": str(out)}
    env.update(DISCO_PEER_TIMEOUT="8", DISCO_CACHE_GROUP_PAUSE="3")
    job = submit("cache_teacher.sbatch", env, tmp_path / "job.log", *CACHE_ARGS)
    log = tmp_path / f"slurm-{job}.log"
    deadline = time.time() + 240
    while len(shard_bytes(out)) < 2:  # each rank's first group written
        assert time.time() < deadline, log.read_text()[-3000:] if log.exists() else queue_and_nodes(job, cluster)
        time.sleep(0.2)
    with node_lost("disco-n2", how, cluster) as lost_at:
        ended_after = seconds_until_it_leaves_running(job, lost_at, log, cluster)
        lost = log.read_text()
    print(f"{how}: the cache pass ended {ended_after:.1f} s after the node was lost")
    assert ended_after < 60, lost[-3000:]
    kept = f"the shards finished so far in {out} are kept; rerun the same command to continue"
    lost_in_one_line(lost, 0, "rank 1 on disco-n2", kept)
    assert 2 <= len(shard_bytes(out)) < 8, lost[-3000:]
    text = requeued_to_completion(job, lost_at, log, cluster)
    assert f"continuing {out}: " in text, text[-3000:]
    assert shard_bytes(out) == shard_bytes(whole_cache)
