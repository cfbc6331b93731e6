"""Run a training command in this process (one rank) and record every call that would make the host wait for a
GPU, made between two optimizer steps outside a boundary (logging, evaluation, checkpoint) and outside the host's
own data path. Used by tests/test_host_syncs.py:

    python tests/host_sync_probe.py OUT.json distill --shards ... --student ...

On a GPU these calls drain the device's queue: reading a value (`.item()`, `bool()`/`float()`/`int()` of a tensor,
`.tolist()`: aten's `_local_scalar_dense`), an op whose output size depends on values (`nonzero`, boolean-mask
indexing, `masked_select`, `unique`), `.numpy()`, `.cpu()`, a `.to(<device>)` without `non_blocking=True` in
disco-dist's code, `torch.cuda.synchronize`, a barrier.
On the CPU they cost nothing, which is why a test has to count them: a slow GPU step looks fine here.
"""

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Where a call may wait: the host's own data (tokenising, shards, batches on the host), the boundary work, and
# the one deliberate read of a step's verdict a step later (an event of that earlier point, not the queue).
ALLOWED_FILES = {"loader.py", "shards.py", "stream.py", "corpus.py", "iters.py", "progress.py"}
ALLOWED_FUNCTIONS = {  # (file, function): a name alone would also pass a same-named function anywhere else
    ("stages.py", "collate"),
    ("encoder.py", "tokenize"),
    ("encoder.py", "token_counts"),
    ("encoder.py", "length_order"),
    ("metrics.py", "flush"),  # Metrics.flush: a log step
    ("metrics.py", "scalar"),  # Metrics.scalar: a skipped step's count, or an evaluation's score
    ("loop.py", "log_gauges"),
    ("loop.py", "evaluate_and_select"),
    ("checkpoint.py", "save_checkpoint"),
    ("resilience.py", "read"),  # Verdict.read
    ("resilience.py", "_read"),  # PreemptionSignal: an all-reduce of host memory
}

state = {"steps": 0, "armed": False, "calls": []}


def allowed(stack) -> bool:
    for frame in stack:
        name = Path(frame.filename).name
        if name in ALLOWED_FILES or (name, frame.name) in ALLOWED_FUNCTIONS:
            return True
    return False


def record(what: str) -> None:
    if not state["armed"] or state.get("done"):
        return  # set-up before the first step's loss, shut-down after the last step
    stack = traceback.extract_stack()[:-2]
    if allowed(stack):
        return
    where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack if "site-packages" not in f.filename]
    inner = [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack[-4:]]
    state["calls"].append({"call": what, "after_step": state["steps"], "ours": where[-3:], "inner": inner})


def wrap(owner, name: str, condition=None) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if condition is None or condition(*args, **kwargs):
            record(f"{getattr(owner, '__name__', owner)}.{name}")
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)


def arm_at(owner, name: str) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        state["armed"] = True
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)


def blocking_device_move(self, *args, **kwargs) -> bool:
    """A `.to(device)` in disco-dist's own code that would wait on a GPU: a host batch must move non-blocking."""
    targets = [a for a in args if isinstance(a, (torch.device, str, torch.Tensor))] + (
        [kwargs["device"]] if "device" in kwargs else []
    )
    if not targets or kwargs.get("non_blocking", False):
        return False
    caller = traceback.extract_stack()[-3]
    return "disco_dist" in caller.filename


DATA_DEPENDENT = {"nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim", "_local_scalar_dense"}


class SyncingOps(TorchDispatchMode):
    """aten ops that read values back to the host: what `.item()` and friends become, whoever calls them, and ops
    whose output size the host must learn (boolean-mask indexing among them)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in DATA_DEPENDENT:
            record(f"aten.{name}")
        elif name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
        ):
            record(f"aten.{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


def main() -> None:
    out, command, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    for name in ("numpy", "cpu", "tolist", "cuda"):
        wrap(torch.Tensor, name)
    wrap(torch.Tensor, "to", blocking_device_move)
    wrap(torch.cuda, "synchronize")
    wrap(torch.cuda.Event, "synchronize")
    wrap(torch.cuda.Stream, "synchronize")
    wrap(torch.distributed, "barrier")

    from deepspeed.runtime.engine import DeepSpeedEngine

    step = DeepSpeedEngine.step

    def counted_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        state["steps"] += 1
        return result

    DeepSpeedEngine.step = counted_step

    from disco_dist.train import loop as train
    from disco_dist.train import stages

    for stage in stages.Stage.__subclasses__():  # armed from the first step's loss on (its forward included)
        arm_at(stage, "loss")
    from disco_dist.cli.commands import run_command

    original_train = train.train

    def traced_train(*args, **kwargs):
        try:
            return original_train(*args, **kwargs)
        finally:
            state["done"] = True

    train.train = traced_train
    try:
        with SyncingOps():
            run_command(command, argv)
    finally:
        # after the last step: the final checkpoint, summary and shut-down
        calls = [c for c in state["calls"] if c["after_step"] < state["steps"]]
        Path(out).write_text(json.dumps({"steps": state["steps"], "calls": calls}, indent=1))
    os._exit(0)


if __name__ == "__main__":
    main()
