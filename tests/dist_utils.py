"""Run a function on W gloo ranks spawned from pytest and collect what each rank returns."""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from disco_dist.distributed import free_port


def _worker(rank, world_size, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()
    # the result is on disk: leave without the interpreter teardown, where gloo's threads occasionally abort
    # the process ("terminate called without an active exception") after a run that succeeded
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(fn, world_size, tmp_path, *args):
    """fn(rank, world_size, *args) on each rank (a module-level function); returns [result of rank 0, ...]."""
    mp.spawn(_worker, args=(world_size, free_port(), fn, args, str(tmp_path)), nprocs=world_size, join=True)
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
