"""FLOPs of a transformer's forward, counted from its own modules over the real (non-padding) tokens, and the
model FLOPs utilisation (MFU) they make against a matmul rate measured on the same device.

Per real token, 2 FLOPs per weight of every `nn.Linear` of the model (projections, feed-forward, and any head it
holds; embeddings are lookups and count nothing); per sequence of L real tokens, attention's scores and weighted sum,
4 x L^2 x (heads x head width) per layer, the whole square even for a causal model (the convention of PaLM's MFU).
Padding tokens are computed but not counted: they are what a better batching saves. Under ZeRO-3 a rank holds a
slice of each weight; the full size (`ds_numel`) is counted.
"""

import time

import torch
import torch.nn.functional as F
from torch import nn


def linear_weights(model: nn.Module) -> int:
    """Elements of the weights of every Linear layer of `model` (and transformers' `Conv1D`, GPT-2's), whole, also
    where ZeRO-3 partitions them."""
    return sum(
        getattr(m.weight, "ds_numel", m.weight.numel())
        for m in model.modules()
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    )


class ForwardFlops:
    """FLOPs of one forward over sentences of given real-token lengths."""

    def __init__(self, model: nn.Module):
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.per_token = 2 * linear_weights(model)
        self.per_square = 4 * config.num_hidden_layers * heads * head_dim

    def __call__(self, lengths) -> float:
        return float(self.per_token * sum(lengths) + self.per_square * sum(n * n for n in lengths))


def mfu(flops: float, seconds: float, peak_flops_per_s: float, devices: int = 1) -> float:
    """The share of `devices` devices' measured matmul rate that `flops` in `seconds` make."""
    return flops / max(seconds, 1e-9) / (peak_flops_per_s * devices)


def matmul_rate(device: torch.device, dtype=torch.float32, size: int = 2048, seconds: float = 2.0) -> float:
    """Dense matmul FLOP/s of this device with the current thread count: the best of timed bursts of
    `F.linear` (x @ W^T), the op a model's Linear layers run; on some CPUs a bf16 `a @ b` takes a path 20x slower
    than it (1.0 against 20.3 GFLOP/s at 1,024 on a 2-core AMD EPYC without AVX-512 BF16), which no model runs.
    Its own random generator: measuring leaves a run's random state (dropout, initialisation) as it was."""
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    for _ in range(2):
        F.linear(a, b)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _synchronize(device)
        t = time.perf_counter()
        for _ in range(4):
            F.linear(a, b)
        _synchronize(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - t))
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
