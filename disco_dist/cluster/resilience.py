"""What keeps a run alive or stops it cleanly: pre-emption, NaN/inf losses, a lost peer, an unwritable run
folder, and the faults the reliability tests inject (docs/reliability.md lists each with its test).

- Pre-emption: SIGUSR2 (SLURM's `--signal=USR2@T`, Submitit's time-out signal) sets a flag; the ranks agree at
  a step boundary, all checkpoint that step, then the job is requeued (`requeue_after`).
- NaN/inf: every rank skips the update of a step whose loss is not finite on any rank, decided on the device
  (`nonfinite_anywhere`, `skip_update_if`); the loop reads the verdict a step later, without waiting.
- A lost peer: a collective that fails because another rank died becomes one line (`lost_peer_error`); a peer
  that went silent (its node's network down, the node frozen) is noticed by heartbeats (`peer_watch.py`).
"""

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from ..core.errors import PeerLost, UserError, exit_now, record_stop
from . import distributed

EXIT_PREEMPTED = 3


class Preempted(Exception):
    """Training stopped at a step boundary on a pre-emption/time-out signal, after a complete checkpoint."""

    def __init__(self, step: int, checkpoint: Path, previous_handler):
        super().__init__(f"stopped at step {step} on a pre-emption signal; checkpoint {checkpoint} is complete")
        self.step, self.checkpoint, self.previous_handler = step, checkpoint, previous_handler


class PreemptionSignal:
    """SIGUSR2 (SLURM's `--signal=USR2@T`, Submitit's time-out signal) sets a flag; at each step boundary the
    ranks agree (any rank signalled -> all stop), so every rank checkpoints the same step. The agreement is an
    all-reduce of host memory started at one step and read at the next, so no rank waits for it: a signal stops
    the run one step after the step that first saw it."""

    def __init__(self, signum=signal.SIGUSR2):
        self.flag = False
        self.previous_handler = signal.signal(signum, self._handle)  # Submitit's requeue handler, if any
        self._box, self._work = None, None

    def _handle(self, signum, frame):
        self.flag = True

    def agreed(self) -> bool:
        if distributed.world_size() == 1:
            return self.flag
        agreed = self._read()
        if not agreed:
            self._box = torch.tensor([1 if self.flag else 0], dtype=torch.int32)
            self._work = torch.distributed.all_reduce(
                self._box, op=torch.distributed.ReduceOp.MAX, group=distributed.host_group(), async_op=True
            )
        return agreed

    def close(self) -> None:
        """Finish the agreement in flight (every rank started it), before the process group goes."""
        self._read()

    def _read(self) -> bool:
        if self._work is None:
            return False
        self._work.wait()
        self._work = None
        return bool(self._box[0])


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
            record_stop(f"{stop}; requeued SLURM job {job}", EXIT_PREEMPTED)  # not requeued twice
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


def lost_peer_error(err: RuntimeError, hint: Callable[[], str]) -> PeerLost | None:
    """The one line for a run whose peer is gone, ending with `hint()`: what is kept and how to go on (None when
    `err` is something else). A library's message goes in whole, its first line."""
    if not lost_a_peer(err):
        return None
    reason = re.sub(r"^\[[^\]]*\] ", "", str(err).splitlines()[0])  # whole, without gloo's source location
    peer = _peer_named_in(str(err))
    return PeerLost(
        f"lost contact with another rank{f', {peer},' if peer else ''} ({reason}): it died or was killed, see its "
        f"log; {hint()}"
    )


@contextmanager
def lost_peer_as_one_line(hint: Callable[[], str]):
    """Inside: a collective that fails because a peer is gone ends the command with `lost_peer_error`'s line."""
    try:
        yield
    except RuntimeError as err:
        lost = lost_peer_error(err, hint)
        if lost is None:
            raise
        raise lost from None


def _peer_named_in(text: str) -> str | None:
    """'rank R on HOST' (or 'a rank on HOST') for the address in a gloo error ("... peer [10.77.0.12]:PORT"), where
    the ranks' hosts are known (distributed.describe_group) and the address is one of theirs."""
    found = re.search(r"\[([0-9.]+)\]:\d+", text)
    if not found:
        return None
    ranks = []
    for rank, host in enumerate(distributed.HOSTS):
        try:
            if rank != distributed.rank() and socket.gethostbyname(host) == found[1]:
                ranks.append(rank)
        except OSError:
            continue
    if not ranks:
        return None
    host = distributed.HOSTS[ranks[0]]
    return f"rank {ranks[0]} on {host}" if len(ranks) == 1 else f"a rank on {host}"


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


def nonfinite_anywhere(loss: torch.Tensor) -> torch.Tensor:
    """1 (int32, on the loss's device) where the loss is NaN or inf on any rank, else 0: every rank skips or
    takes the same step. An all-reduce queued on the device: the host does not wait for it (on a GPU); the
    optimizer reads it there (`skip_update_if`) and the loop a step later."""
    bad = (~torch.isfinite(loss.detach())).any().to(torch.int32).reshape(1)
    if distributed.world_size() > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad


class Verdict:
    """A step's `nonfinite_anywhere` flag, copied to pinned host memory as soon as the device has it; `read` waits
    for that point alone (an event), not for the work queued after it, so reading it a step later never drains
    the GPU's queue."""

    def __init__(self, skipped: torch.Tensor):
        self.event = None
        if skipped.device.type == "cuda":
            self.host = torch.empty(skipped.shape, dtype=skipped.dtype, pin_memory=True)
            self.host.copy_(skipped, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = skipped

    def read(self) -> bool:
        """True where the step's update was skipped."""
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host[0])


def skip_update_if(optimizer, skipped: torch.Tensor) -> None:
    """The next `optimizer.step()` leaves weights, moments and step counts as they are where `skipped` is set,
    decided on the device: torch's fused AdamW reads it as GradScaler's `found_inf`."""
    if not optimizer.defaults.get("fused"):
        raise ValueError("skip_update_if needs a fused optimizer (it skips on the device)")
    optimizer.found_inf = skipped.float().reshape(())  # 0-dim, as the fused kernel and its step counts take it


class InjectedFaults:
    """Faults the reliability tests inject, read from the environment once:
    DISCO_INJECT_NAN_AT_BATCHES=3,4 makes the loss of those batches (numbered within the epoch) NaN;
    DISCO_KILL_RANK_AT_STEP=1:7 makes rank 1 SIGKILL itself in the middle of step 7 (after the forward,
    before the backward), first writing the time to <run-dir>/killed-at;
    DISCO_CACHE_GROUP_PAUSE=S makes the cache pass wait S seconds after each group of shards it wrote, so that a
    test can lose a node between two groups; DISCO_STEP_PAUSE=S makes every training step wait S seconds (in the
    middle, as the kill), so that a fault injected from outside (tests/soak.py) lands at the step it chose."""

    def __init__(self):
        self.cache_pause = float(os.environ.get("DISCO_CACHE_GROUP_PAUSE", "0"))
        self.step_pause = float(os.environ.get("DISCO_STEP_PAUSE", "0"))
        self.nan_batches = set(filter(None, os.environ.get("DISCO_INJECT_NAN_AT_BATCHES", "").split(",")))
        rank_step = os.environ.get("DISCO_KILL_RANK_AT_STEP")
        self.kill = tuple(int(x) for x in rank_step.split(":")) if rank_step else None

    def nan_at(self, batch: int) -> bool:
        return str(batch) in self.nan_batches

    def mid_step(self, rank: int, step: int, run_dir: Path) -> None:
        if self.step_pause:
            time.sleep(self.step_pause)
        if self.kill == (rank, step):
            (run_dir / "killed-at").write_text(f"{time.time()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
