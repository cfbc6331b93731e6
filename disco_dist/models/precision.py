"""The compute precision of a run: `--precision fp32 | bf16 | auto`, and for `auto` the measurement that decides.

bf16 pays only where the hardware multiplies bf16 faster than fp32: on a GPU with bf16 it does; on CPUs it
varies (an AMD EPYC here multiplied bf16 ~2.2x faster than fp32 on one core, an Intel Xeon without AMX 0.6x).
So on a CPU `auto` times a few milliseconds of matrix products in both precisions, at the process's thread
count, and picks bf16 when it is at least `BF16_MIN_SPEEDUP` times fp32; rank 0 measures and decides for every
rank (they must agree). What was decided and why goes into a training run's config.json (a resumed run keeps
it); a cache's index records the precision its embeddings were computed in.

Where bf16 is used: the student trains under `torch.autocast` (fp32 master weights, optimizer state and
gradients; the losses computed in fp32 on fp32 embeddings); a frozen teacher holds bf16 weights.
The default of `--precision` is `$DISCO_PRECISION` when set (a cluster-wide choice), else auto.
"""

import os
import time
from dataclasses import asdict, dataclass

import torch

from ..cluster import distributed
from ..core.errors import UserError

CHOICES = ("auto", "fp32", "bf16")
BF16_MIN_SPEEDUP = 1.5  # matmul rate ratio; a training step gains less than the matmul (LayerNorm, optimizer)


def default_precision() -> str:
    value = os.environ.get("DISCO_PRECISION", "auto")
    if value not in CHOICES:
        raise UserError(f"DISCO_PRECISION={value}: set it to one of {', '.join(CHOICES)}, or unset it (auto)")
    return value


@dataclass
class Precision:
    name: str  # "bf16" | "fp32": what the run computes in
    requested: str  # what --precision said
    reason: str  # why, in words
    fp32_gflops: float | None = None  # the probe's rates (CPU auto only)
    bf16_gflops: float | None = None

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def matmul_gflops(dtype: torch.dtype, size: int = 512, seconds: float = 0.02) -> float:
    """GFLOP/s of `size` x `size` products in `dtype` on the CPU, best of the products run in about `seconds`."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # first call: kernel selection, page faults
    best, deadline = float("inf"), time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        a @ b
        now = time.perf_counter()
        best = min(best, now - start)
        if now > deadline:
            return 2 * size**3 / best / 1e9


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """What `--precision` means on this device; with several ranks, rank 0's decision for all."""
    if requested in ("fp32", "bf16"):
        return Precision(requested, requested, "asked for")
    if device.type == "cuda":
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return Precision(name, requested, f"auto: the GPU {'supports' if name == 'bf16' else 'lacks'} bf16")
    decided = None
    if distributed.rank() == 0:
        fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
        ratio = bf16 / fp32
        name = "bf16" if ratio >= BF16_MIN_SPEEDUP else "fp32"
        reason = (
            f"auto: bf16 matmul ran {ratio:.2f}x fp32 on this CPU ({bf16:.0f} vs {fp32:.0f} GFLOP/s, "
            f"{torch.get_num_threads()} thread(s)); bf16 needs >= {BF16_MIN_SPEEDUP}x"
        )
        decided = Precision(name, requested, reason, round(fp32, 1), round(bf16, 1))
    return distributed.broadcast_object(decided)
