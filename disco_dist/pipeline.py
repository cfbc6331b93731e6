"""The DisCo pipeline as Submitit jobs: shards -> [teacher cache] -> distill -> fine-tune -> evaluate.

One SLURM job per stage, each with its own resources, chained with `afterok` dependencies (a failed stage
cancels the rest). The training stages are `Checkpointable`: on the pre-timeout/pre-emption signal every
rank checkpoints at a step boundary, then Submitit requeues the job, which resumes (`--resume auto`).
"""
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from .errors import UserError


def _export_rank_environment(threads: int) -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT for this task, from Submitit's job environment."""
    if "RANK" not in os.environ:
        from .distributed import job_master_port

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


class StageJob(submitit.helpers.Checkpointable):
    """One stage, run on every task of its job. `checkpoint` (Submitit's requeue hook) resubmits it as is:
    the training stages always carry `--resume auto`, so the requeued job continues from the checkpoint."""

    def __init__(self, stage: str, argv: list, threads: int = 1):
        self.stage, self.argv, self.threads = stage, [str(a) for a in argv], threads

    def __call__(self):
        _export_rank_environment(self.threads)
        if self.stage in ("distill", "finetune"):
            return self._train()
        return _run_launcher(self.stage, self.argv)

    def _train(self):
        from .config import parse
        from .train import STAGES, Preempted, train

        make_parser, stage_class = STAGES[self.stage]
        try:
            return str(train(parse(make_parser(), self.argv), stage_class))
        except Preempted as stop:
            # every rank has written the checkpoint; now Submitit's own handler requeues (rank 0 exits in it)
            print(stop, flush=True)
            if callable(stop.previous_handler):
                stop.previous_handler(signal.SIGUSR2, None)
            # Only rank 0 gets here (the handler requeues and exits it). The others leave quietly, a moment
            # later, so that the requeue is in before the job could look finished.
            time.sleep(10)
            os._exit(0)


def _run_launcher(stage: str, argv: list):
    """The stage's launcher `main`, undecorated: a UserError travels to Submitit (and so to submit.py) whole."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "launchers" / LAUNCHERS[stage]
    spec = importlib.util.spec_from_file_location(f"disco_launcher_{stage}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main.__wrapped__(argv)
    return stage


LAUNCHERS = {"shards": "make_shards.py", "cache": "cache_teacher.py", "distill": "distill.py",
             "finetune": "finetune.py", "evaluate": "evaluate.py"}


@dataclass
class Resources:
    nodes: int = 1
    tasks_per_node: int = 2
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    timeout_min: int = 120
    partition: str | None = None

    def single(self) -> "Resources":
        """One task on one node: for the stages that are not distributed (shards, evaluation)."""
        return Resources(1, 1, self.cpus_per_task * self.tasks_per_node, min(self.gpus_per_node, 1),
                         self.timeout_min, self.partition)


@dataclass
class Stage:
    name: str
    argv: list
    resources: Resources
    job: object = field(default=None, repr=False)


def make_executor(folder: Path, local: bool, resources: Resources, name: str):
    """Submitit's AutoExecutor: SLURM, or its LocalExecutor with `local` (same parameters, same job code)."""
    executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if local else "slurm")
    params = dict(timeout_min=resources.timeout_min, nodes=resources.nodes, tasks_per_node=resources.tasks_per_node,
                  cpus_per_task=resources.cpus_per_task, name=f"disco-{name}")
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
        raise UserError(f"no SLURM controller answers ({last}); on this machine: slurm/local-cluster.sh start and "
                        "export the SLURM_CONF it prints, or use --local")


def submit(stages: list, log_folder: Path, local: bool, log=print) -> list:
    """Submit the stages in order. On SLURM each waits for the one before (afterok); locally they run one
    after another (Submitit's LocalExecutor has no dependencies), each finished before the next starts."""
    if not local:
        check_slurm()
    previous = None
    for stage in stages:
        executor = make_executor(log_folder, local, stage.resources, stage.name)
        if previous is not None and not local:
            executor.update_parameters(slurm_additional_parameters={
                "dependency": f"afterok:{previous.job.job_id}", "kill-on-invalid-dep": "yes"})
        if previous is not None and local:
            wait_for(previous, log)
        stage.job = executor.submit(StageJob(stage.name, stage.argv, stage.resources.cpus_per_task))
        log(f"submitted {stage.name:<9} job {stage.job.job_id}")
        previous = stage
    return stages


def wait_for(stage: Stage, log=print) -> None:
    """Block until the stage's job ends; a failed stage raises UserError with its error."""
    try:
        stage.job.results()  # one result per task
    except Exception as err:  # submitit re-raises the job's failure here
        tail = _stderr_tail(stage.job)
        raise UserError(f"stage {stage.name} (job {stage.job.job_id}) failed: {_first_line(err)}"
                        + (f"\n--- its stderr ends with ---\n{tail}" if tail else "")) from None
    log(f"{stage.name:<9} job {stage.job.job_id}: finished")


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
