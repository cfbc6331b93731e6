"""The frozen teacher under DeepSpeed ZeRO-3 inference.

ZeRO-3 partitions the teacher's parameters across the ranks and gathers each layer's for its forward, so
every rank must run the same number of teacher forwards (else the gathers hang). Build the student
before the teacher: transformers' HfDeepSpeedConfig is process-global while it lives.
"""

import time
from dataclasses import dataclass
from functools import partial

import torch

from ..cluster import distributed
from ..cluster.distributed import to_device
from ..cluster.ds_config import load_ds_config
from ..core.errors import UserError
from .encoder import Encoder
from .flops import ForwardFlops, matmul_rate
from .heap import give_back_after_each, heap_given_back
from .layers import transformer_layers
from .partitioned import held_and_total, load_partitioned, partition_token_embedding
from .precision import default_precision, resolve_precision


def default_teacher_batch_size(device: torch.device, partitioned: bool) -> int:
    """Sentences per teacher forward. On a GPU a large batch amortises ZeRO-3's parameter gathering. On a
    CPU big padded batches run slower per sentence, so a lone teacher runs 16 at a time (as fast as
    sentence-transformers' best), and a ZeRO-3 teacher 64, which pays one gather per 64 sentences (measured on
    2 CPU ranks, 2,048 sentences, sentences/s: ZeRO-3 15.3 / 17.6 / 16.2 and replicated 24.0 / 20.5 / 17.2 at
    16 / 64 / 128; see docs/benchmarks.md)."""
    if device.type == "cuda":
        return 256
    return 64 if partitioned else 16


def default_token_budget(device: torch.device, partitioned: bool) -> int | None:
    """Padded tokens per forward of the cache pass, in place of a fixed sentence count (short sentences then share a
    bigger batch): 1,024 for a CPU teacher that is not partitioned (the cache pass 1.1x faster than 16 sentences a
    batch; see docs/benchmarks.md); None (fixed counts) on a GPU and under ZeRO-3, whose gathers favour big batches."""
    return 1024 if device.type == "cpu" and not partitioned else None


@dataclass(frozen=True)
class TeacherSettings:
    """Which teacher, partitioned how, embedding how many sentences a forward (see cli/config_teacher.py's flags)."""

    model: str
    ds_config: str
    batch_size: int | None = None  # sentences a forward; None: the device's default
    max_length: int | None = None
    precision: str | None = None  # None: --precision's default ($DISCO_PRECISION, else auto)
    prompt: str | None = None
    dim: int | None = None  # Matryoshka-truncate the teacher's embeddings
    replicated: bool = False  # a whole copy on each rank instead of ZeRO-3 partitions


class ZeroTeacher:
    """A frozen Encoder whose parameters are partitioned across ranks (ZeRO-3 inference). With one rank
    there is nothing to partition: the teacher is then a plain module (ZeRO-3's hooks cost ~15% there), as it
    is on every rank with `replicated` (no gathers; each rank holds it all)."""

    def __init__(self, settings: TeacherSettings, device: torch.device):
        from transformers.integrations import HfDeepSpeedConfig

        self.precision = resolve_precision(settings.precision or default_precision(), device)
        self.bf16 = self.precision.bf16
        config = load_ds_config(settings.ds_config, bf16=self.bf16)
        if config.get("zero_optimization", {}).get("stage") != 3:
            raise UserError(f"{settings.ds_config}: the teacher config must use zero_optimization.stage 3")
        self.partitioned = distributed.world_size() > 1 and not settings.replicated
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        how = dict(max_length=settings.max_length, prompt=settings.prompt, truncate_dim=settings.dim)
        if self.partitioned:
            hf_zero3 = HfDeepSpeedConfig(config)  # while alive, models are built straight into partitions
            try:
                with heap_given_back():
                    loader = partial(load_partitioned, dtype=dtype)
                    self.encoder = Encoder.from_pretrained(settings.model, model_loader=loader, **how)
                    partition_token_embedding(self.encoder.model)
            finally:
                del hf_zero3  # anything built after this is an ordinary, unpartitioned model
            self.engine, *_ = distributed.import_deepspeed().initialize(model=self.encoder.model, config=config)
            if device.type == "cpu":  # the gathers' freed buffers go back after each layer (disco_dist/models/heap.py)
                try:
                    parent, attr = transformer_layers(self.encoder.model)
                    give_back_after_each(getattr(parent, attr))
                except UserError:  # layers it cannot find (T5's blocks, GPT-2's h): trimmed after each forward
                    give_back_after_each([self.encoder.model])
        else:
            self.encoder = Encoder.from_pretrained(settings.model, **how)
            self.encoder.to(device, dtype)
        if self.encoder.dense is not None:  # a teacher's own Dense head: small, held whole by every rank
            self.encoder.dense.to(device, dtype).requires_grad_(False)
        self.encoder.model.eval()
        self.encoder.model.requires_grad_(False)
        self.device = device
        self.batch_size = settings.batch_size or default_teacher_batch_size(device, self.partitioned)
        self.seconds = 0.0  # time spent in teacher forwards, for the step-time breakdown
        self.forwards = 0
        self.tokens, self.flops = 0, 0.0  # real tokens embedded, and their forward FLOPs (flops.py)
        self._flops = ForwardFlops(self.encoder.model)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def describe(self) -> dict:
        """What its embeddings depend on, as the cache's index records it."""
        return {
            "model": str(self.encoder.model.name_or_path),
            "dim": self.dim,
            "pooling": self.encoder.pooling,
            "normalize": self.encoder.normalize,
            "max_length": self.encoder.max_length,
            "prompt": self.encoder.prompt,
            "truncate_dim": self.encoder.truncate_dim,
            "precision": "bf16" if self.bf16 else "fp32",
        }

    def batches(self, sentences: list, token_budget: int | None = None, lengths: list | None = None) -> list:
        """The index lists of `sentences` that `embed` runs, one per forward, of token-count-sorted sentences (little
        padding): `batch_size` at a time, shortest first; or, with `token_budget`, longest first, each batch as many
        sentences as fit in that many padded tokens (its first sentence's count times its size; one at least).
        `lengths`: their `token_counts` where already known."""
        lengths = self.encoder.token_counts(sentences) if lengths is None else lengths
        order = self.encoder.length_order(sentences, lengths)
        if not token_budget:
            return [order[first : first + self.batch_size] for first in range(0, len(order), self.batch_size)]
        batches = []
        for i in reversed(order):
            if not batches or lengths[batches[-1][0]] * (len(batches[-1]) + 1) > token_budget:
                batches.append([])
            batches[-1].append(i)
        return batches

    @torch.no_grad()
    def embed(
        self, sentences: list, progress=None, token_budget: int | None = None, on_device: bool = False
    ) -> torch.Tensor:
        """Teacher embeddings (float32) in their order, computed in the forwards `batches` plans; on the CPU, or
        with `on_device` where the teacher runs (an online teacher's targets: no copy to the host and back, and the
        host does not wait for the forwards). `progress.update(n)` after each forward. Collective under ZeRO-3:
        every rank must run as many forwards as the others (`self.forwards` counts them)."""
        start = time.perf_counter()
        out = torch.empty(len(sentences), self.dim, device=self.device if on_device else "cpu")
        lengths = self.encoder.token_counts(sentences)
        for index in self.batches(sentences, token_budget, lengths):
            real = [lengths[i] for i in index]
            self.tokens, self.flops = self.tokens + sum(real), self.flops + self._flops(real)
            batch = self.encoder.tokenize([sentences[i] for i in index])
            embeddings = self.encoder(
                to_device(batch["input_ids"], self.device), to_device(batch["attention_mask"], self.device)
            ).float()
            if on_device:
                out[to_device(torch.tensor(index), out.device)] = embeddings
            else:
                out[index] = embeddings.cpu()
            self.forwards += 1
            if progress is not None:
                progress.update(len(index))
        self.seconds += time.perf_counter() - start
        return out

    def matmul_rate(self) -> float:
        """Matmul FLOP/s of the teacher's device in the teacher's dtype, measured now (about a second): what its
        MFU is counted against."""
        cuda = self.device.type == "cuda"
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        return matmul_rate(self.device, dtype, size=8192 if cuda else 1024, seconds=1.0 if cuda else 0.3)

    def padding_forward(self) -> None:
        """A throw-away forward, so a rank with nothing left keeps step with the others' gathers (not counted as
        embedded tokens or FLOPs)."""
        counted = self.tokens, self.flops
        self.embed(["."])
        self.tokens, self.flops = counted

    def local_parameter_fraction(self) -> float:
        """Share of the teacher's parameter elements this rank holds (about 1/W under ZeRO-3)."""
        held, total = held_and_total(self.encoder.model)
        return held / total
