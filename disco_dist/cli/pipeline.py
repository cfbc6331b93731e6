"""The DisCo pipeline as Submitit jobs: shards -> [teacher cache] -> distill -> fine-tune -> evaluate.

One SLURM job per pipeline `Job` (each runs one command of disco_dist.cli.commands), each with its own resources,
chained with `afterok` dependencies (a failed job cancels the rest). The training jobs are `Checkpointable`:
on the pre-timeout/pre-emption signal every rank checkpoints at a step boundary, then Submitit requeues the
job, which resumes (`--resume auto`).
"""

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from ..core.errors import UserError


def _export_rank_environment(threads: int) -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT for this task, from Submitit's job environment."""
    if "RANK" not in os.environ:
        from ..cluster.distributed import job_master_port

        # not Submitit's TorchDistributedEnvironment: its port is a random one in 20000-60000, where the
        # system's own ports may hold it, and it refuses to run where the user has set MASTER_PORT
        job = submitit.JobEnvironment()
        os.environ.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank))
        os.environ.setdefault("MASTER_ADDR", job.hostnames[0])
        os.environ.setdefault("MASTER_PORT", str(job_master_port(job.job_id)))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


class JobCall(submitit.helpers.Checkpointable):
    """One pipeline job's command, run on every task of its job. `checkpoint` (Submitit's requeue hook) resubmits
    it as is: the training commands always carry `--resume auto`, so the requeued job continues from the
    checkpoint that every rank wrote on the signal (disco_dist.cluster.resilience.requeue_after)."""

    def __init__(self, command: str, argv: list, threads: int = 1):
        self.command, self.argv, self.threads = command, [str(a) for a in argv], threads

    def __call__(self):
        from .commands import run_command

        _export_rank_environment(self.threads)
        return run_command(self.command, self.argv)


# pipeline job -> the command it runs (disco_dist.cli.commands; launchers/<command>.py)
COMMAND_OF = {
    "shards": "make_shards",
    "cache": "cache_teacher",
    "distill": "distill",
    "finetune": "finetune",
    "evaluate": "evaluate",
}


@dataclass
class Resources:
    nodes: int = 1
    tasks_per_node: int = 2
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    timeout_min: int = 120
    partition: str | None = None

    def single(self) -> "Resources":
        """One task on one node: for the jobs that are not distributed (shards, evaluation)."""
        return Resources(
            1, 1, self.cpus_per_task * self.tasks_per_node, min(self.gpus_per_node, 1), self.timeout_min, self.partition
        )


@dataclass
class Job:
    """One job of the pipeline: its name (a key of COMMAND_OF), the command's flags, its resources, and once
    submitted, Submitit's handle."""

    name: str
    argv: list
    resources: Resources
    submitted: object = field(default=None, repr=False)

    def describe(self) -> str:
        r = self.resources
        return (
            f"{self.name:<9} nodes={r.nodes} tasks/node={r.tasks_per_node} cpus/task={r.cpus_per_task} "
            f"gpus/node={r.gpus_per_node} time={r.timeout_min}min  "
            f"launchers/{COMMAND_OF[self.name]}.py {' '.join(shlex.quote(str(a)) for a in self.argv)}"
        )


def build_jobs(args) -> list:
    """The pipeline's jobs for submit.py's flags (their defaults: recipes/demo.json)."""
    from ..report.recipes import flags

    run = args.run_dir.resolve()
    shards, cached = run / "shards", run / "shards-teacher"
    common = {"data_root": args.data_root}
    training = Resources(
        args.nodes, args.tasks_per_node, args.cpus_per_task, args.gpus_per_node, args.time, args.partition
    )
    shard_flags = dict(out=shards, limit=args.sentences, shard_size=args.shard_size, overwrite=True, corpus=args.corpus)
    distill = dict(
        shards=cached if args.teacher_mode == "cached" else shards,
        student=args.student,
        keep_layers=args.keep_layers or None,
        teacher=args.teacher,
        run_dir=run / "distill",
        resume="auto",
    )
    finetune = dict(student=run / "distill" / "final", run_dir=run / "finetune", resume="auto")
    jobs = [
        Job("shards", flags({**shard_flags, **common}) + shlex.split(args.shards_args), training.single()),
        Job("cache", flags(dict(shards=shards, out=cached, teacher=args.teacher, overwrite=True)), training),
        Job("distill", flags({**distill, **common}) + shlex.split(args.distill_args), training),
        Job("finetune", flags({**finetune, **common}) + shlex.split(args.finetune_args), training),
        Job(
            "evaluate",
            [run / "finetune" / "final", *flags(dict(out=run / "eval_sts.json", label="DisCo student", **common))],
            training.single(),
        ),
    ]
    if args.teacher_mode != "cached":
        jobs = [job for job in jobs if job.name != "cache"]
    return [job for job in jobs if job.name not in args.skip]


def make_executor(folder: Path, local: bool, resources: Resources, name: str):
    """Submitit's AutoExecutor: SLURM, or its LocalExecutor with `local` (same parameters, same job code)."""
    executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if local else "slurm")
    params = dict(
        timeout_min=resources.timeout_min,
        nodes=resources.nodes,
        tasks_per_node=resources.tasks_per_node,
        cpus_per_task=resources.cpus_per_task,
        name=f"disco-{name}",
    )
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    if not local:
        params["slurm_signal_delay_s"] = 120  # SIGUSR2 this long before the time limit: checkpoint and requeue
        # a task that fails ends the job at once, instead of its peers waiting out their rendezvous timeout
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        if resources.partition:
            params["slurm_partition"] = resources.partition
    executor.update_parameters(**params)
    return executor


def check_slurm() -> None:
    """One line instead of sbatch's traceback when no controller answers."""
    import shutil
    import subprocess

    if shutil.which("sinfo") is None:
        raise UserError("SLURM's commands are not installed here; use --local, or run on a cluster's login node")
    result = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"no SLURM controller answers ({last}); on this machine: slurm/local-cluster.sh start and "
            "export the SLURM_CONF it prints, or use --local"
        )


def submit(jobs: list, log_folder: Path, local: bool, log=print) -> list:
    """Submit the jobs in order. On SLURM each waits for the one before (afterok); locally they run one
    after another (Submitit's LocalExecutor has no dependencies), each finished before the next starts."""
    if not local:
        check_slurm()
    previous = None
    for job in jobs:
        executor = make_executor(log_folder, local, job.resources, job.name)
        if previous is not None and not local:
            executor.update_parameters(
                slurm_additional_parameters={
                    "dependency": f"afterok:{previous.submitted.job_id}",
                    "kill-on-invalid-dep": "yes",
                }
            )
        if previous is not None and local:
            wait_for(previous, log)
        job.submitted = executor.submit(JobCall(COMMAND_OF[job.name], job.argv, job.resources.cpus_per_task))
        log(f"submitted {job.name:<9} job {job.submitted.job_id}")
        previous = job
    return jobs


def wait_for(job: Job, log=print) -> None:
    """Block until the job ends; a failed job raises UserError with its error."""
    try:
        job.submitted.results()  # one result per task
    except Exception as err:  # submitit re-raises the job's failure here
        tail = _stderr_tail(job.submitted)
        raise UserError(
            f"{job.name} job {job.submitted.job_id} failed: {_first_line(err)}"
            + (f"\n--- its stderr ends with ---\n{tail}" if tail else "")
        ) from None
    log(f"{job.name:<9} job {job.submitted.job_id}: finished")


def follow(jobs: list, log=print) -> None:
    """Wait for every job in order; when one fails, cancel the ones after it and raise its error."""
    for job in jobs:
        try:
            wait_for(job, log)
        except UserError:
            for later in jobs[jobs.index(job) + 1 :]:
                if later.submitted is not None:
                    later.submitted.cancel(check=False)
            raise


def _first_line(err: Exception) -> str:
    """The job's own error message out of the traceback text Submitit hands back."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or line.startswith("error:")]
    line = (errors or lines or [type(err).__name__])[-1]
    return re.split(r"\b(?:User|Rank)Error: ", line, maxsplit=1)[-1]  # our errors' messages stand alone


def _stderr_tail(job, lines: int = 15) -> str:
    try:
        text = job.stderr() or ""
    except Exception:  # the log may not exist (job never started)
        return ""
    noise = ("[WARNING]", "Warning", "warnings.warn", "return func(", "Loading weights", "Writing model")
    kept = [line for line in text.splitlines() if line.strip() and not any(n in line for n in noise)]
    return "\n".join(kept[-lines:])
