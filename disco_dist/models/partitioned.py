"""A ZeRO-3 teacher's partitions: each rank reads only its share of the checkpoint, and token embeddings are
looked up in the partitions without gathering the table.

ZeRO-3 gives rank r of W the flat elements [r * P, (r + 1) * P) of every parameter (P = ceil(numel / W), the
last partition padded). transformers' own ZeRO-3 loading has rank 0 map the whole checkpoint and scatter it,
so rank 0 briefly holds all the weights; here every rank builds the empty partitioned model and reads exactly
its own elements out of the safetensors files, a chunk at a time.

The token embedding is the largest parameter of an LLM embedder (151,669 x 4,096 in Qwen3-Embedding-8B:
1.2 GB in bf16) and ZeRO-3 would gather it whole for every forward, though a batch reads a few hundred rows.
`PartitionedEmbedding` keeps it partitioned: each rank looks up the rows it holds of the token ids any rank asks
for, zeros elsewhere, and one all-reduce of those (distinct ids x hidden) rows sums them, exactly (every element
comes from one rank).
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SAFETENSORS_INDEX = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CHUNK_BYTES = 16 << 20  # read at most this much at a time: a rank's transient memory while loading


class Checkpoint:
    """The tensors of a model folder's safetensors files, read by flat element ranges with plain reads (no memory
    map: a map's touched pages would count against the rank until it is closed)."""

    def __init__(self, folder):
        import json

        folder = Path(folder)
        if (folder / SAFETENSORS_INDEX).is_file():
            names = sorted(set(json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"].values()))
        else:
            names = ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
        self.tensors = {}  # name -> (file, first byte, dtype, shape)
        for name in names:
            with open(folder / name, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for key, info in header.items():
                if key != "__metadata__":
                    start = 8 + size + info["data_offsets"][0]
                    self.tensors[key] = (folder / name, start, DTYPES.get(info["dtype"]), tuple(info["shape"]))

    def key_for(self, name: str, prefix: str) -> str | None:
        """The checkpoint's name for a model tensor: as is, with the base model's prefix (a checkpoint saved from
        a task model, e.g. `model.layers.0...` of a CausalLM), or without it."""
        for key in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if key in self.tensors:
                return key
        return None

    def check(self, key: str, shape: tuple) -> None:
        """ValueError unless the tensor has a dtype this reader knows and the model's shape."""
        _, _, dtype, found = self.tensors[key]
        if dtype is None or found != tuple(shape):
            raise ValueError(
                f"{key}: {dtype or 'an unknown dtype'} {found} in the checkpoint, {tuple(shape)} in the model"
            )

    def read(self, key: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Flat elements [start, end) of a tensor, in the file's dtype."""
        path, first, dtype, shape = self.tensors[key]
        end = math.prod(shape) if end is None else end
        data = bytearray((end - start) * dtype.itemsize)
        with open(path, "rb") as f:
            f.seek(first + start * dtype.itemsize)
            f.readinto(data)
        return torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)


def partition_range(param: nn.Parameter) -> tuple:
    """[start, end) of the flat elements this rank holds of a ZeRO-3 parameter (end - start < P on the last ranks)."""
    import torch.distributed as dist

    size, rank = param.ds_tensor.numel(), dist.get_rank(group=param.ds_process_group)
    return min(rank * size, param.ds_numel), min((rank + 1) * size, param.ds_numel)


def _fill_partition(param: nn.Parameter, checkpoint: Checkpoint, key: str) -> None:
    """Copy this rank's flat elements of a ZeRO-3 parameter from the checkpoint, CHUNK_BYTES at a time."""
    checkpoint.check(key, param.ds_shape)
    start, end = partition_range(param)
    step = max(1, CHUNK_BYTES // checkpoint.tensors[key][2].itemsize)
    for first in range(start, end, step):
        last = min(first + step, end)
        param.ds_tensor.data[first - start : last - start].copy_(checkpoint.read(key, first, last))


def _empty_partitioned_model(config, dtype: torch.dtype):
    """The model built under zero.Init with its weights left uninitialised (they are read next). transformers'
    `from_config` under ZeRO-3 would then initialise every weight again, gathering each module's parameters whole
    (the token embedding too): 250 MiB more per rank for the 701 MiB model, and time."""
    from transformers import AutoModel

    try:
        import deepspeed
        from transformers.initialization import no_init_weights
        from transformers.integrations.deepspeed import deepspeed_config, prevent_arange_dtype_change
        from transformers.modeling_utils import set_zero3_state
    except ImportError:  # another transformers version: its own way, with the re-initialisation
        return AutoModel.from_config(config, dtype=dtype)
    with no_init_weights(), prevent_arange_dtype_change():
        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()), set_zero3_state():
            return AutoModel.from_config(config, dtype=dtype)


def load_partitioned(path, dtype: torch.dtype, log=print):
    """The model of `path` built straight into ZeRO-3 partitions (an `HfDeepSpeedConfig` must be alive), each rank
    reading only its own elements. Falls back to transformers' loading (rank 0 reads everything) for a checkpoint
    that is not safetensors or whose names or shapes do not match the model, and says so on rank 0."""
    linear = F.linear
    try:
        return _load_partitioned(path, dtype, log)
    finally:
        # zero.Init replaces torch's F.linear for the whole process with a matmul-then-add (less memory in a backward
        # the teacher never runs); it rounds differently from the fused one, so the ZeRO-3 teacher's embeddings (and
        # the student's, in the same process) would differ in the last bits from a plain process's
        F.linear = linear


def _load_partitioned(path, dtype: torch.dtype, log):
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModel

    checkpoint, rank = Checkpoint(path) if Path(path).is_dir() else None, dist.get_rank()
    problem = "no safetensors checkpoint"
    if checkpoint and checkpoint.tensors:
        model = _empty_partitioned_model(AutoConfig.from_pretrained(path), dtype)
        prefix = model.base_model_prefix
        try:
            for name, param in model.named_parameters():
                key = checkpoint.key_for(name, prefix)
                if key is None:
                    raise ValueError(f"no tensor for {name}")
                _fill_partition(param, checkpoint, key)
            for name, buffer in model.named_buffers():
                key = checkpoint.key_for(name, prefix)
                if key is not None:
                    checkpoint.check(key, buffer.shape)
                    buffer.copy_(checkpoint.read(key).view(buffer.shape))
            return model
        except ValueError as err:
            problem = str(err)
        del model
    if rank == 0:
        log(f"teacher {path}: {problem}; loading through transformers instead (rank 0 reads the whole checkpoint)")
    return AutoModel.from_pretrained(path, dtype=dtype)


class PartitionedEmbedding(nn.Module):
    """A token-embedding table left in its ZeRO-3 partitions: rank r keeps the rows its flat partition covers
    (a row split between two ranks is kept by both, zero outside each one's part), and a lookup sums every rank's
    rows with one all-reduce. Holds 1/W of the table instead of gathering it whole for each forward."""

    def __init__(self, weight: nn.Parameter):

        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.ds_shape
        self.group = weight.ds_process_group
        start, end = partition_range(weight)
        self.first_row = start // self.embedding_dim
        rows = -(-end // self.embedding_dim) - self.first_row if end > start else 0
        offset = start - self.first_row * self.embedding_dim
        if offset == 0 and end - start == rows * self.embedding_dim:  # whole rows (W divides the vocabulary)
            table = weight.ds_tensor.data[: end - start]  # the partition itself, no copy
        else:
            table = weight.ds_tensor.new_zeros(rows * self.embedding_dim)
            table[offset : offset + end - start] = weight.ds_tensor.data[: end - start]
        self.rows = table.view(rows, self.embedding_dim)  # a plain tensor: ZeRO-3 never sees or gathers it
        self.total_numel = weight.ds_numel

    @property
    def held_numel(self) -> int:
        return self.rows.numel()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Ranks may look up different batches (the cache pass): the union of every rank's token ids is gathered,
        each rank fills the rows it holds, and one all-reduce of (union x hidden) completes them everywhere."""
        import torch.distributed as dist

        wanted, where = torch.unique(input_ids, return_inverse=True)
        counts = [wanted.new_zeros(1) for _ in range(dist.get_world_size(group=self.group))]
        dist.all_gather(counts, wanted.new_tensor([len(wanted)]), group=self.group)
        padded = F.pad(wanted, (0, int(max(counts)) - len(wanted)), value=-1)
        every = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(every, padded, group=self.group)
        union = torch.unique(torch.cat(every))
        union = union[union >= 0]
        local = union - self.first_row
        inside = (local >= 0) & (local < len(self.rows))
        if len(self.rows):
            rows = F.embedding(local.clamp(0, len(self.rows) - 1), self.rows).masked_fill(~inside.unsqueeze(-1), 0)
        else:
            rows = self.rows.new_zeros(len(union), self.embedding_dim)
        dist.all_reduce(rows, group=self.group)
        return rows[torch.searchsorted(union, wanted)][where]


def partition_token_embedding(model: nn.Module) -> bool:
    """Replace the model's ZeRO-3 token embedding by a `PartitionedEmbedding` before `deepspeed.initialize`.
    Only a plain `nn.Embedding` (no max_norm): a subclass (e.g. Gemma's scaled embedding) does more than a lookup
    and stays gathered. Returns whether it was replaced."""
    embedding = model.get_input_embeddings()
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None or not hasattr(embedding.weight, "ds_id"):
        return False
    model.set_input_embeddings(PartitionedEmbedding(embedding.weight))
    return True


def held_and_total(model: nn.Module) -> tuple:
    """(elements this rank holds, elements of the whole model) over parameters and partitioned embeddings."""
    held = total = 0
    for p in model.parameters():
        total += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    for m in model.modules():
        if isinstance(m, PartitionedEmbedding):
            held, total = held + m.held_numel, total + m.total_numel
    return held, total
