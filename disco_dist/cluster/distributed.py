"""Process-group set-up and the two kinds of all-gather the losses need.

Rank, world size and local rank come from the launcher's environment (`deepspeed`, `torchrun`), else
from SLURM's (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`). CPU: gloo, fp32. GPU: NCCL, bf16.
"""

import datetime
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..core.errors import RankError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_int(*names, default):
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def read_env(local_rank_flag: int | None = None) -> DistEnv:
    rank = env_int("RANK", "SLURM_PROCID", default=0)
    world_size = env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = (
        local_rank_flag
        if local_rank_flag is not None and local_rank_flag >= 0
        else env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    )
    if torch.cuda.is_available():
        # under SLURM each task may see all GPUs or only its own (CUDA_VISIBLE_DEVICES remapped to one)
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return DistEnv(rank, world_size, local_rank, device)


def init_distributed(local_rank_flag: int | None = None, timeout_s: float = 600) -> DistEnv:
    """Join the process group (idempotent) and return this process' place in it.

    The timeout bounds every collective: if a peer dies, the others fail after it instead of hanging."""
    env = read_env(local_rank_flag)
    for name, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank)):
        os.environ.setdefault(name, str(value))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_default_master_port(env.world_size)))
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    deepspeed = import_deepspeed()
    if not dist.is_initialized():
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        try:
            deepspeed.init_distributed(
                dist_backend=backend,
                auto_mpi_discovery=False,
                timeout=datetime.timedelta(seconds=timeout_s),
                rank=env.rank,
                world_size=env.world_size,
                distributed_port=int(os.environ["MASTER_PORT"]),
            )
        except dist.DistNetworkError as err:
            if "EADDRINUSE" not in str(err):
                raise
            raise RankError(
                f"the rendezvous port {os.environ['MASTER_PORT']} on {os.environ['MASTER_ADDR']} is in "
                "use by another process; set MASTER_PORT to a free port and rerun"
            ) from None
        if env.world_size > 1:
            if backend != "gloo":  # host-memory collectives (the pre-emption agreement) need a gloo group;
                # across nodes it picks its interface as gloo does: GLOO_SOCKET_IFNAME where the default is wrong
                _HOST_GROUP.append(dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)))
            describe_group(env)
    return env


_HOST_GROUP: list = []


def host_group():
    """The process group for collectives on host (CPU) tensors: the default group under gloo, else a gloo group
    made at start-up (NCCL reduces only GPU tensors)."""
    return _HOST_GROUP[0] if _HOST_GROUP else None


HOSTS: list = []  # the host of each rank, once the group is up (for naming a lost rank)


def describe_group(env: DistEnv) -> None:
    """One line on rank 0: which host each rank runs on and where the rendezvous is (what a multi-node job's
    log should show first: a rank on the wrong host, or a rendezvous on a loopback address, is a broken job)."""
    hosts = all_gather_objects(socket.gethostname())
    HOSTS[:] = hosts
    if env.rank != 0:
        return
    address = os.environ["MASTER_ADDR"]
    try:
        resolved = socket.gethostbyname(address)
    except OSError:
        resolved = "unresolved"
    by_host = {}
    for rank, host in enumerate(hosts):
        by_host.setdefault(host, []).append(rank)
    placed = "; ".join(f"{host}: ranks {','.join(map(str, ranks))}" for host, ranks in by_host.items())
    print(
        f"process group: {env.world_size} ranks on {len(by_host)} host(s) ({placed}); rendezvous {address} "
        f"({resolved}) port {os.environ['MASTER_PORT']}",
        flush=True,
    )


def _default_master_port(world_size: int) -> int:
    if world_size == 1:  # any free port, so that several single-process runs can share a machine
        return free_port()
    if "SLURM_JOB_ID" in os.environ:  # srun's tasks: one port per job, so that jobs can share a node
        return job_master_port(os.environ["SLURM_JOB_ID"])
    return 29500


def job_master_port(job_id: str) -> int:
    """The rendezvous port that every rank of a SLURM job derives alike from the job id. It lies below
    Linux's ephemeral range (32768-60999), from which the system hands out the ports of outgoing connections
    and of gloo's own listeners: a port derived inside that range is now and then already taken."""
    return 10000 + int(job_id.split("_")[0]) % 20000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(ranks: int, *args, module: bool = False) -> list[str]:
    """The argv that starts `args` (a script and its flags; with `module`, a module name and its flags) as
    `ranks` ranks under this environment's deepspeed launcher, on a free rendezvous port so that it can run
    beside other distributed runs. A module is not handed `--local_rank` (LOCAL_RANK is in its environment)."""
    launcher = Path(sys.executable).with_name("deepspeed")
    how = ["--module", "--no_local_rank"] if module else []
    return [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()), *how, *map(str, args)]


def module_argv(module: str, *args, ranks: int = 0) -> list[str]:
    """The argv that runs `python -m module args`: as `ranks` ranks under the deepspeed launcher, or one plain
    process when `ranks` is 0."""
    if ranks:
        return deepspeed_command(ranks, module, *args, module=True)
    return [sys.executable, "-m", module, *map(str, args)]


def command_argv(name: str, *args, ranks: int = 0) -> list[str]:
    """The argv of one of the pipeline's commands (disco_dist.cli.commands; the same as launchers/NAME.py)."""
    return module_argv("disco_dist.cli.commands", name, *args, ranks=ranks)


def import_deepspeed():
    """deepspeed, set up for this machine. Use it instead of `import deepspeed` before initialising anything.

    On CPU, DeepSpeed's first init_distributed JIT-compiles a shared-memory all-reduce (45-80 s) that
    neither ZeRO nor our gathers use (gloo serves every collective), so it is not built there."""
    import importlib
    import warnings

    import deepspeed

    # DeepSpeed's ZeRO-3 calls a torch collective that torch now flags on every gather; not ours to fix
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

    if not torch.cuda.is_available():
        # by module path: the attribute deepspeed.comm.torch is shadowed by the torch package itself
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def shutdown(through_barrier=None) -> None:
    """Leave the process group once every rank is here; `through_barrier()` runs between the two."""
    if dist.is_initialized():
        dist.barrier()
        if through_barrier is not None:
            through_barrier()
        dist.destroy_process_group()
    _HOST_GROUP.clear()


def exit_process(code: int = 0) -> None:
    """End a rank whose work is done and written: leave the process group, flush, and exit without the
    interpreter's teardown, where a C++ thread left behind by the communication stack occasionally aborts
    the process ("terminate called without an active exception") after a run that succeeded."""
    import sys

    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def threads_per_rank(ranks: int) -> str:
    """OMP_NUM_THREADS for `ranks` processes on one machine: its cores split evenly (else they fight over them)."""
    return str(max(1, (os.cpu_count() or ranks) // ranks))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0; gradients flow back to the rank that owns each part.

    torch.distributed.nn's all_gather sums the incoming gradients of each part over the ranks in backward;
    with the engine averaging gradients over ranks, W ranks x B then train exactly like 1 rank x W*B."""
    if world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


@torch.no_grad()
def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without the host waiting: on a GPU from pinned memory with a non-blocking copy (a plain
    `.to("cuda")` waits for the copy, and so for every kernel queued before it); on the CPU the tensor itself."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, non_blocking=True)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0, for values that need no gradient (teacher embeddings)."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...] for any picklable obj (small things: counts, file entries)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
