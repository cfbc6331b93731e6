"""The frozen teacher under DeepSpeed ZeRO-3 inference, and the pass that caches its embeddings in shards.

ZeRO-3 partitions the teacher's parameters across the ranks and gathers each layer's for its forward, so
every rank must run the same number of teacher forwards (else the gathers hang). Build the student
before the teacher: transformers' HfDeepSpeedConfig is process-global while it lives.
"""
import json
import time
from pathlib import Path

import torch

from . import distributed
from .encoder import Encoder
from .errors import UserError
from .shards import ShardFile, iter_shard_samples, prepare_output_folder, read_index, write_index


def load_ds_config(path, micro_batch_size: int | None = None, bf16: bool = False) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist; see ds_configs/ for the shipped ones")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"DeepSpeed config {path} is not valid JSON ({err})") from None
    if micro_batch_size is not None:
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
        config["gradient_accumulation_steps"] = 1
        config.pop("train_batch_size", None)  # derived from the two above and the world size
    config.setdefault("train_micro_batch_size_per_gpu", 1)  # required even for inference
    config["bf16"] = {**config.get("bf16", {}), "enabled": bf16}
    return config


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


class ZeroTeacher:
    """A frozen Encoder whose parameters are partitioned across ranks (ZeRO-3 inference)."""

    def __init__(self, name_or_path, ds_config_path, device: torch.device, batch_size: int = 256,
                 max_length: int | None = None):
        from transformers import AutoModel
        from transformers.integrations import HfDeepSpeedConfig

        config = load_ds_config(ds_config_path, bf16=bf16_supported(device))
        if config.get("zero_optimization", {}).get("stage") != 3:
            raise UserError(f"{ds_config_path}: the teacher config must use zero_optimization.stage 3")
        hf_zero3 = HfDeepSpeedConfig(config)  # while alive, from_pretrained loads straight into partitions
        try:
            self.encoder = Encoder.from_pretrained(name_or_path, max_length=max_length,
                                                   model_loader=AutoModel.from_pretrained)
        finally:
            del hf_zero3  # anything built after this is an ordinary, unpartitioned model
        self.engine, *_ = distributed.import_deepspeed().initialize(model=self.encoder.model, config=config)
        self.encoder.model.eval()
        self.encoder.model.requires_grad_(False)
        self.device, self.batch_size = device, batch_size
        self.seconds = 0.0  # time spent in teacher forwards, for the step-time breakdown

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @torch.no_grad()
    def embed(self, sentences: list) -> torch.Tensor:
        """Teacher embeddings (float32, CPU) in their order, computed in `batch_size` chunks of length-sorted
        sentences (little padding). Collective: every rank must call this with the same number of chunks,
        ceil(len(sentences) / batch_size)."""
        start = time.perf_counter()
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        out = torch.empty(len(sentences), self.dim)
        for first in range(0, len(order), self.batch_size):
            index = order[first:first + self.batch_size]
            batch = self.encoder.tokenize([sentences[i] for i in index]).to(self.device)
            out[index] = self.encoder(batch["input_ids"], batch["attention_mask"]).float().cpu()
        self.seconds += time.perf_counter() - start
        return out

    def padding_forward(self) -> None:
        """A throw-away forward, so a rank with nothing left keeps step with the others' gathers."""
        self.embed(["."])

    def local_parameter_fraction(self) -> float:
        """Share of the teacher's parameter elements this rank holds (about 1/W under ZeRO-3)."""
        held = total = 0
        for p in self.encoder.model.parameters():
            total += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        return held / total


def cache_teacher_embeddings(teacher: ZeroTeacher, source_folder, out_folder, env, overwrite=False, log=print):
    """Write new shards holding each sentence with its fp16 teacher embedding; the same names and counts as
    the source. Rank r writes shards r, r+W, ...; rank 0 writes the index once every rank is done."""
    source = read_index(source_folder)
    if source.teacher is not None:
        raise UserError(f"{source_folder} already holds teacher embeddings ({source.teacher['model']})")
    if env.is_main:
        prepare_output_folder(out_folder, overwrite)
    distributed.barrier()
    mine = list(range(env.rank, len(source.shards), env.world_size))
    forwards_needed = [sum(-(-source.counts[i] // teacher.batch_size) for i in range(r, len(source.shards), env.world_size))
                       for r in range(env.world_size)]
    written, forwards = [], 0
    for i in mine:
        shard = ShardFile(Path(out_folder) / source.shards[i]["name"])
        samples = list(iter_shard_samples([source.paths()[i]], with_keys=True))
        embeddings = teacher.embed([text for _, text, _ in samples])
        forwards += -(-len(samples) // teacher.batch_size)
        for (key, text, _), embedding in zip(samples, embeddings.numpy()):
            shard.write(key, text, embedding)
        written.append((i, shard.close()))
        if env.is_main:
            log(f"rank 0: {source.shards[i]['name']} done ({len(written)}/{len(mine)} of this rank's shards)")
    for _ in range(max(forwards_needed) - forwards):
        teacher.padding_forward()
    entries = [entry for per_rank in distributed.all_gather_objects(written) for entry in per_rank]
    if env.is_main:
        entries = [entry for _, entry in sorted(entries, key=lambda item: item[0])]
        meta = {k: v for k, v in source.meta.items() if k != "format"}
        index = write_index(out_folder, source.total, entries, **meta, teacher_source=str(Path(source_folder).resolve()),
                            teacher={"model": str(teacher.encoder.model.name_or_path), "dim": teacher.dim,
                                     "dtype": "float16", "pooling": teacher.encoder.pooling,
                                     "normalize": teacher.encoder.normalize, "max_length": teacher.encoder.max_length})
        log(f"wrote {index.total} sentences with teacher embeddings in {len(entries)} shards to {out_folder}")
    distributed.barrier()
