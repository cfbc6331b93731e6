"""Against a real single-node SLURM (slurm/local-cluster.sh, started by .ci/run or here): the batch script,
the Submitit pipeline, and the checkpoint-on-signal path that requeueing relies on."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, build_tiny_run_inputs, scalars, start_cluster

from disco_dist.cluster.distributed import deepspeed_command


@pytest.fixture(scope="module")
def slurm_env():
    return start_cluster()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    sentences = [f"the {i} dog plays in the park with {i % 7} children" for i in range(400)]
    return build_tiny_run_inputs(tmp_path_factory.mktemp("slurm"), sentences, shard_size=50)


def sacct_state(job_id, env):
    for _ in range(40):  # accounting lags the job's end by a moment
        out = subprocess.run(
            ["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True, env=env
        ).stdout.split()
        if out and out[0] not in ("RUNNING", "PENDING", "COMPLETING"):
            return out[0]
        time.sleep(0.5)
    return out[0] if out else "UNKNOWN"


@pytest.mark.slow
def test_sbatch_ckd_two_tasks_completes(slurm_env, tiny, tmp_path):
    root, student, teacher, _ = tiny
    run_dir = tmp_path / "run"
    env = {
        **slurm_env,
        "RUN_DIR": str(run_dir),
        "SHARDS": str(root / "shards"),
        "STUDENT": str(student),
        "TEACHER": str(teacher),
        "KEEP_LAYERS": "",
    }
    result = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--wait",
            "--ntasks-per-node=2",
            "--output",
            str(tmp_path / "out.log"),
            str(REPO / "slurm" / "ckd.sbatch"),
            "--max-steps",
            "8",
            "--batch-size",
            "8",
            "--queue-size",
            "64",
            "--log-every",
            "4",
            "--head-init",
            "random",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    job_id = result.stdout.strip().split(";")[0]
    log = (tmp_path / "out.log").read_text() if (tmp_path / "out.log").exists() else ""
    assert result.returncode == 0, log[-3000:] + result.stderr
    assert sacct_state(job_id, slurm_env) == "COMPLETED"
    assert "finished: 8 steps" in log
    assert (run_dir / "ckd" / "final" / "model.safetensors").exists()
    assert json.loads((run_dir / "ckd" / "config.json").read_text())["world_size"] == 2
    assert set(scalars(run_dir / "ckd")["loss/ckd"]) == {4, 8}
    assert (run_dir / f"slurm-{job_id}.log").exists()  # the job's log is in the run folder too

    # the sibling script for stage 2, through the same helper, on the student just made
    env.update(STUDENT=str(run_dir / "ckd" / "final"), RUN_DIR=str(run_dir / "finetune"))
    result = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--wait",
            "--output",
            str(tmp_path / "ft.log"),
            str(REPO / "slurm" / "finetune.sbatch"),
            "--max-steps",
            "4",
            "--batch-size",
            "4",
            "--max-triplets",
            "64",
            "--eval-every",
            "2",
            "--log-every",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, (tmp_path / "ft.log").read_text()[-3000:] + result.stderr
    assert sacct_state(result.stdout.strip().split(";")[0], slurm_env) == "COMPLETED"
    assert (run_dir / "finetune" / "final" / "model.safetensors").exists()


def submit(args, env, timeout=420):
    """launchers/submit.py; if it outlives `timeout` (under pytest's own limit), the test fails with the
    cluster's view and the jobs' logs, and its jobs are cancelled so that they cannot hold the node."""
    try:
        return subprocess.run(
            [sys.executable, str(REPO / "launchers" / "submit.py"), *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        jobs = [line.split()[-1] for line in out.splitlines() if line.startswith("submitted")]
        queue = subprocess.run(["squeue", "-o", "%i %j %T %r"], capture_output=True, text=True, env=env).stdout
        subprocess.run(["scancel", *jobs], env=env)
        run_dir = Path(args[args.index("--run-dir") + 1])
        logs = "".join(f"--- {log}\n{log.read_text()[-1500:]}" for log in sorted(run_dir.glob("submitit/*/*.err")))
        pytest.fail(f"submit.py still running after {timeout}s\n{out}\nsqueue:\n{queue}\n{logs}")


def tiny_pipeline_args(root, student, teacher, corpus, run_dir):
    return [
        "--run-dir",
        run_dir,
        "--corpus",
        corpus,
        "--sentences",
        300,
        "--shard-size",
        50,
        "--teacher",
        teacher,
        "--student",
        student,
        "--keep-layers",
        "all",
        "--time",
        20,
        "--distill-args",
        "--max-steps 6 --batch-size 8 --queue-size 64 --log-every 3",
        "--finetune-args",
        "--max-steps 4 --batch-size 4 --max-triplets 64 --eval-every 2 --log-every 2",
    ]


@pytest.mark.slow
def test_submit_pipeline_all_jobs_complete_in_order(slurm_env, tiny, tmp_path):
    root, student, teacher, corpus = tiny
    run_dir = tmp_path / "pipeline"
    result = submit(tiny_pipeline_args(root, student, teacher, corpus, run_dir), slurm_env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("submitted")]
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("submitted")] == [
        "shards",
        "cache",
        "distill",
        "finetune",
        "evaluate",
    ]
    assert [sacct_state(j, slurm_env) for j in jobs] == ["COMPLETED"] * 5
    starts = [
        subprocess.run(
            ["sacct", "-j", j, "-X", "-n", "-P", "-o", "Start"], capture_output=True, text=True, env=slurm_env
        ).stdout.strip()
        for j in jobs
    ]
    assert starts == sorted(starts)  # each stage started after the one before
    scores = json.loads((run_dir / "eval_sts.json").read_text())["scores"]
    assert set(scores) == {"STS12", "STS13", "STS14", "STS15", "STS16", "STS-B", "SICK-R", "avg"}
    assert "TensorBoard: tensorboard --logdir" in result.stdout


@pytest.mark.slow
def test_submit_failing_job_stops_the_chain_with_its_error(slurm_env, tiny, tmp_path):
    root, student, teacher, corpus = tiny
    args = tiny_pipeline_args(root, student, teacher, tmp_path / "no-such-corpus.txt", tmp_path / "broken")
    result = submit(args, slurm_env, timeout=240)
    assert result.returncode == 2
    assert "shards job" in result.stderr and "failed" in result.stderr
    assert "no-such-corpus.txt" in result.stderr  # the stage's own one-line error reaches the user
    later = [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("submitted")][1:]
    assert later and all(sacct_state(j, slurm_env) in ("CANCELLED", "CANCELLED+") for j in later)


@pytest.mark.slow
def test_submit_taken_rendezvous_port_ends_the_job_with_one_line(slurm_env, tiny, tmp_path):
    """A rank that cannot rendezvous ends its job at once (srun --kill-on-bad-exit) with a line naming the
    port, instead of its peers waiting out the rendezvous timeout and the job its time limit."""
    root, student, teacher, corpus = tiny
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.time()
        result = submit(
            tiny_pipeline_args(root, student, teacher, corpus, tmp_path / "port"),
            {**slurm_env, "MASTER_PORT": str(port)},
            timeout=240,
        )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "cache job" in result.stderr and f"rendezvous port {port}" in result.stderr, result.stderr[-2000:]
    assert time.time() - started < 180  # not the 600 s rendezvous timeout


def test_job_ports_lie_below_the_ephemeral_range():
    """Ports the system hands out for passing connections must never collide with a job's rendezvous port."""
    from disco_dist.cluster.distributed import job_master_port

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [job_master_port(str(job_id)) for job_id in range(1, 100_000, 7)] + [job_master_port("123_4")]
    assert all(1024 < port < low for port in ports)
    assert job_master_port("123_4") == job_master_port("123")  # an array's tasks share their job's port


@pytest.mark.slow
def test_signal_checkpoints_at_a_step_boundary_and_resume_continues(tiny, tmp_path):
    """What a requeue relies on: SIGUSR2 to the ranks -> all checkpoint the same step and stop; rerun resumes."""
    root, student, teacher, _ = tiny
    run_dir = tmp_path / "run"
    args = deepspeed_command(
        2,
        REPO / "launchers" / "distill.py",
        "--shards",
        root / "shards",
        "--student",
        student,
        "--teacher",
        teacher,
        "--run-dir",
        run_dir,
        "--batch-size",
        4,
        "--epochs",
        50,
        "--queue-size",
        32,
        "--log-every",
        5,
        "--checkpoint-every",
        0,
        "--head-init",
        "random",
        "--resume",
        "auto",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step 10/"):
            ranks = subprocess.run(
                ["pgrep", "-f", f"distill.py --local_rank=.*{run_dir}"], capture_output=True, text=True
            ).stdout.split()
            assert len(ranks) == 2
            for pid in ranks:  # the ranks only: SIGUSR2 would end the deepspeed launcher itself
                os.kill(int(pid), signal.SIGUSR2)
            break
    output = "".join(lines) + process.stdout.read()
    process.wait(timeout=120)
    assert "on a pre-emption signal" in output and "rerun with --resume auto" in output, output[-3000:]
    stopped_at = int(output.split("stopped at step ")[1].split()[0])
    assert (run_dir / "checkpoints" / f"step-{stopped_at:08d}" / "COMPLETE").exists()
    resumed = subprocess.run(
        [str(a) for a in args] + ["--max-steps", str(stopped_at + 5)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert f"at step {stopped_at}" in resumed.stdout and f"finished: {stopped_at + 5} steps" in resumed.stdout, (
        resumed.stdout[-3000:] + resumed.stderr[-2000:]
    )


@pytest.mark.slow
def test_submitit_training_job_requeues_and_resumes(tiny, tmp_path):
    """Submitit's path: SIGUSR2 to the job's tasks -> checkpoint at a step boundary -> Submitit requeues the
    job (LocalExecutor: restarts its tasks) -> the job resumes from that checkpoint and finishes."""
    from disco_dist.cli.pipeline import Job, Resources
    from disco_dist.cli.pipeline import submit as submit_jobs

    root, student, teacher, _ = tiny
    run_dir = tmp_path / "run"
    argv = [
        "--shards",
        root / "shards",
        "--student",
        student,
        "--teacher",
        teacher,
        "--run-dir",
        run_dir,
        "--batch-size",
        4,
        "--epochs",
        50,
        "--max-steps",
        300,
        "--queue-size",
        32,
        "--log-every",
        5,
        "--checkpoint-every",
        0,
        "--head-init",
        "random",
        "--resume",
        "auto",
    ]
    (job,) = submit_jobs(
        [Job("distill", argv, Resources(1, 2, 1, 0, 10))], tmp_path / "logs" / "%j", local=True, log=lambda *_: None
    )
    deadline = time.time() + 300
    while "step 10/" not in (job.submitted.stdout() or ""):
        assert time.time() < deadline and job.submitted.state not in ("FINISHED", "INTERRUPTED"), job.submitted.stderr()
        time.sleep(0.5)
    tasks = subprocess.run(
        ["pgrep", "-f", f"submitit.core._submit.*{tmp_path / 'logs'}"], capture_output=True, text=True
    ).stdout.split()
    assert len(tasks) == 2
    for pid in tasks:
        os.kill(int(pid), signal.SIGUSR2)
    results = job.submitted.results()
    assert results[0] == str(run_dir / "final")
    log = job.submitted.stdout()
    stopped_at = int(log.split("stopped at step ")[1].split()[0])
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{stopped_at:08d}'} at step {stopped_at}" in log
    assert "finished: 300 steps" in log


@pytest.mark.slow
def test_submitit_training_job_that_loses_a_rank_says_so_in_one_line(tiny, tmp_path):
    """Submitit's path runs the same command code as a launcher: a rank killed mid-run ends the job with the
    lost-peer line (naming the last complete checkpoint), not gloo's bare error."""
    from disco_dist.cli.pipeline import Job, Resources, wait_for
    from disco_dist.cli.pipeline import submit as submit_jobs
    from disco_dist.core.errors import UserError

    root, student, teacher, _ = tiny
    run_dir = tmp_path / "run"
    argv = ["--shards", root / "shards", "--student", student, "--teacher", teacher, "--run-dir", run_dir]
    argv += ["--batch-size", 4, "--max-steps", 20, "--queue-size", 32, "--checkpoint-every", 5, "--head-init", "random"]
    os.environ["DISCO_KILL_RANK_AT_STEP"] = "1:8"  # the job's tasks inherit it at submission
    try:
        (job,) = submit_jobs(
            [Job("distill", argv, Resources(1, 2, 1, 0, 10))], tmp_path / "logs" / "%j", local=True, log=lambda *_: None
        )
    finally:
        del os.environ["DISCO_KILL_RANK_AT_STEP"]
    with pytest.raises(UserError, match="lost contact with another rank") as failed:
        wait_for(job, log=lambda *_: None)
    assert "step-00000005" in str(failed.value) and "--resume auto" in str(failed.value)
