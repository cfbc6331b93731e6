"""What keeps a run alive or stops it cleanly: pre-emption, NaN/inf losses, a lost peer, an unwritable run
folder, and the faults the reliability tests inject (docs/reliability.md lists each with its test).

- Pre-emption: SIGUSR2 (SLURM's `--signal=USR2@T`, Submitit's time-out signal) sets a flag; the ranks agree at
  a step boundary, all checkpoint that step, then the job is requeued (`requeue_after`).
- NaN/inf: every rank skips a step whose loss is not finite on any rank (`finite_on_every_rank`).
- A lost peer: a collective that fails because another rank died becomes one line (`lost_peer_error`).
"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import torch

from . import distributed
from .checkpoint import latest_checkpoint
from .errors import RankError, UserError, exit_now

EXIT_PREEMPTED = 3


class Preempted(Exception):
    """Training stopped at a step boundary on a pre-emption/time-out signal, after a complete checkpoint."""

    def __init__(self, step: int, checkpoint: Path, previous_handler):
        super().__init__(f"stopped at step {step} on a pre-emption signal; checkpoint {checkpoint} is complete")
        self.step, self.checkpoint, self.previous_handler = step, checkpoint, previous_handler


class PreemptionSignal:
    """SIGUSR2 (SLURM's `--signal=USR2@T`, Submitit's time-out signal) sets a flag; at each step boundary the
    ranks agree (any rank signalled -> all stop), so every rank checkpoints the same step."""

    def __init__(self, signum=signal.SIGUSR2):
        self.flag = False
        self.previous_handler = signal.signal(signum, self._handle)  # Submitit's requeue handler, if any

    def _handle(self, signum, frame):
        self.flag = True

    def agreed(self) -> bool:
        if distributed.world_size() == 1:
            return self.flag
        flag = torch.tensor([1.0 if self.flag else 0.0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def requeue_after(stop: Preempted) -> None:
    """After every rank checkpointed on a pre-emption signal: requeue the job and exit. Under Submitit its own
    handler requeues (and exits rank 0); a batch job is requeued with `scontrol requeue`; elsewhere the user
    reruns with --resume auto."""
    if "SUBMITIT_FOLDER" in os.environ:
        print(stop, flush=True)
        if callable(stop.previous_handler):
            stop.previous_handler(signal.SIGUSR2, None)
        # Submitit's handler requeues the job and exits rank 0; the other ranks get here and leave quietly, a
        # moment later, so that the requeue is in before the job could look finished.
        time.sleep(10)
        os._exit(0)
    job = os.environ.get("SLURM_JOB_ID")
    if distributed.rank() == 0:
        print(f"{stop}", flush=True)
        if job:
            subprocess.run(["scontrol", "requeue", job], check=False)  # argv list: no shell
            print(f"requeued SLURM job {job}; it resumes from the checkpoint (--resume auto)", flush=True)
        else:
            print("rerun with --resume auto to continue", flush=True)
    exit_now(EXIT_PREEMPTED)


def lost_a_peer(err: RuntimeError) -> bool:
    """A collective failed because another rank is gone (gloo: connection closed; any backend: time-out)."""
    if isinstance(err, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(err)
    return any(
        sign in text
        for sign in (
            "Connection closed by peer",
            "Connection reset by peer",
            "timed out",
            "Timed out",
            "NCCL communicator was aborted",
        )
    )


def lost_peer_error(err: RuntimeError, run_dir) -> RankError | None:
    """The one line for a run whose peer is gone (None when `err` is something else)."""
    if not lost_a_peer(err):
        return None
    latest = latest_checkpoint(run_dir)
    reason = re.sub(r"^\[[^\]]*\] ", "", str(err).splitlines()[0])[:120]  # without gloo's source location
    return RankError(
        f"lost contact with another rank ({reason}): it died or was killed, see its log; the last "
        f"complete checkpoint is {latest or 'none yet'}; rerun with --resume auto"
    )


def check_writable(run_dir: Path) -> None:
    """Fail at the start, in one line, if the run folder cannot take files (not a folder, read-only, full)."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"run folder {run_dir} is not writable ({err.strerror}); choose another --run-dir or free space there"
        ) from None


def finite_on_every_rank(loss: torch.Tensor) -> bool:
    """One small all-reduce: every rank skips (or takes) the same step."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if distributed.world_size() > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad.item() == 0.0


class InjectedFaults:
    """Faults the reliability tests inject, read from the environment once:
    DISCO_INJECT_NAN_AT_BATCHES=3,4 makes the loss of those batches (numbered within the epoch) NaN;
    DISCO_KILL_RANK_AT_STEP=1:7 makes rank 1 SIGKILL itself in the middle of step 7 (after the forward,
    before the backward), first writing the time to <run-dir>/killed-at."""

    def __init__(self):
        self.nan_batches = set(filter(None, os.environ.get("DISCO_INJECT_NAN_AT_BATCHES", "").split(",")))
        rank_step = os.environ.get("DISCO_KILL_RANK_AT_STEP")
        self.kill = tuple(int(x) for x in rank_step.split(":")) if rank_step else None

    def nan_at(self, batch: int) -> bool:
        return str(batch) in self.nan_batches

    def mid_step(self, rank: int, step: int, run_dir: Path) -> None:
        if self.kill == (rank, step):
            (run_dir / "killed-at").write_text(f"{time.time()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
