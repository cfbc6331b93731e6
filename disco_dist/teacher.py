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
from .evaluate import write_json_atomic
from .fetch import sha256_of
from .shards import (INDEX, ShardFile, count_shard_samples, iter_shard_samples, prepare_output_folder, read_index,
                     verified_index, write_index)


def load_ds_config(path, micro_batch_size: int | None = None, bf16: bool = False) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist; see ds_configs/ for the shipped ones")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"DeepSpeed config {path} is not valid JSON ({err})") from None
    check_ds_config_keys(config, path)
    if micro_batch_size is not None:
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
        config["gradient_accumulation_steps"] = 1
        config.pop("train_batch_size", None)  # derived from the two above and the world size
    config.setdefault("train_micro_batch_size_per_gpu", 1)  # required even for inference
    config["bf16"] = {**config.get("bf16", {}), "enabled": bf16}
    return config


# DeepSpeed's documented top-level sections. DeepSpeed itself ignores a key it does not know, so a typo such
# as "zero_optimisation" would silently train without ZeRO; we refuse it instead.
DS_TOP_LEVEL_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "communication_data_type", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients", "fp16", "bf16",
    "amp", "torch_autocast", "gradient_clipping", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown",
    "flops_profiler", "activation_checkpointing", "sparse_attention", "data_efficiency", "curriculum_learning",
    "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "elasticity", "aio", "autotuning",
    "compression_training", "checkpoint", "data_types", "pipeline", "dataloader_drop_last", "compile",
    "hybrid_engine", "weight_quantization", "nebula", "eigenvalue", "progressive_layer_drop", "quantize_training",
    "timers", "disable_allgather", "gradient_allreduce_op", "seq_parallel_communication_data_type",
    "use_data_before_expert_parallelism", "graph_harvesting", "tensor_parallel", "zero_allow_comm_data_type_fp32",
    "bf16_master_weights_and_grads", "bf16_optimizer_states", "fp16_master_weights_and_grads",
}


def check_ds_config_keys(config: dict, path) -> None:
    """Unknown top-level keys (keys starting with "_" are comments) and bad `zero_optimization` keys or
    values, named in one line."""
    if not isinstance(config, dict):
        raise UserError(f"DeepSpeed config {path} must be a JSON object")
    unknown = sorted(k for k in config if k not in DS_TOP_LEVEL_KEYS and not k.startswith("_"))
    if unknown:
        raise UserError(f"DeepSpeed config {path}: unknown key(s) {', '.join(unknown)}; DeepSpeed would ignore "
                        "them silently (see https://www.deepspeed.ai/docs/config-json/)")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError(f"DeepSpeed config {path}: zero_optimization must be an object")
    from pydantic import ValidationError

    distributed.import_deepspeed()
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UserError(f"DeepSpeed config {path}: zero_optimization.{where}: {first['msg']}") from None


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def use_bf16(precision: str, device: torch.device) -> bool:
    """--precision: "bf16", "fp32", or "auto" (bf16 where the GPU supports it; fp32 on CPU)."""
    return precision == "bf16" or (precision == "auto" and bf16_supported(device))


def default_teacher_batch_size(device: torch.device, partitioned: bool) -> int:
    """Sentences per teacher forward. On a GPU a large batch amortises ZeRO-3's parameter gathering. On a
    CPU big padded batches run slower per sentence, so a lone teacher runs 16 at a time (as fast as
    sentence-transformers' best), and a ZeRO-3 teacher 64, which pays one gather per 64 sentences (measured on
    2 CPU ranks, 2,048 sentences, sentences/s: ZeRO-3 15.3 / 17.6 / 16.2 and replicated 24.0 / 20.5 / 17.2 at
    16 / 64 / 128; see docs/benchmarks.md)."""
    if device.type == "cuda":
        return 256
    return 64 if partitioned else 16


class ZeroTeacher:
    """A frozen Encoder whose parameters are partitioned across ranks (ZeRO-3 inference). With one rank
    there is nothing to partition: the teacher is then a plain module (ZeRO-3's hooks cost ~15% there)."""

    def __init__(self, name_or_path, ds_config_path, device: torch.device, batch_size: int | None = None,
                 max_length: int | None = None, precision: str = "auto"):
        from transformers import AutoModel
        from transformers.integrations import HfDeepSpeedConfig

        self.bf16 = use_bf16(precision, device)
        config = load_ds_config(ds_config_path, bf16=self.bf16)
        if config.get("zero_optimization", {}).get("stage") != 3:
            raise UserError(f"{ds_config_path}: the teacher config must use zero_optimization.stage 3")
        self.partitioned = distributed.world_size() > 1
        if self.partitioned:
            hf_zero3 = HfDeepSpeedConfig(config)  # while alive, from_pretrained loads straight into partitions
            try:
                self.encoder = Encoder.from_pretrained(name_or_path, max_length=max_length,
                                                       model_loader=AutoModel.from_pretrained)
            finally:
                del hf_zero3  # anything built after this is an ordinary, unpartitioned model
            self.engine, *_ = distributed.import_deepspeed().initialize(model=self.encoder.model, config=config)
        else:
            self.encoder = Encoder.from_pretrained(name_or_path, max_length=max_length)
            self.encoder.to(device, torch.bfloat16 if self.bf16 else torch.float32)
        self.encoder.model.eval()
        self.encoder.model.requires_grad_(False)
        self.device, self.batch_size = device, batch_size or default_teacher_batch_size(device, self.partitioned)
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


CACHE_PLAN = "cache-plan.json"  # in an unfinished cache folder: what its finished shards were made from


def shard_groups(shards: list, counts: list, group_sentences: int) -> list:
    """Consecutive shards joined until a group holds at least `group_sentences` sentences."""
    groups, current, size = [], [], 0
    for i in shards:
        current.append(i)
        size += counts[i]
        if size >= group_sentences:
            groups.append(current)
            current, size = [], 0
    return groups + ([current] if current else [])


def cache_teacher_embeddings(teacher: ZeroTeacher, source_folder, out_folder, env, overwrite=False, log=print,
                             group_sentences: int = 4096):
    """Write new shards holding each sentence with its fp16 teacher embedding; the same names and counts as
    the source. Rank r writes shards r, r+W, ...; rank 0 writes the index once every rank is done.

    Re-running the same command on an unfinished folder continues it: finished shards are kept (each is
    renamed into place only when whole) if the folder's plan matches this source, teacher and max length."""
    source = verified_index(read_index(source_folder), env.rank, env.world_size, "stop")
    if source.teacher is not None:
        raise UserError(f"{source_folder} already holds teacher embeddings ({source.teacher['model']})")
    out_folder = Path(out_folder)
    plan = cache_plan(teacher, source_folder)
    done = set(_finished_shards(source, out_folder, plan, overwrite))  # every rank: a refusal stops them all
    distributed.barrier()
    if env.is_main:
        prepare_output_folder(out_folder, overwrite, keep_finished_shards=True)
        write_json_atomic(out_folder / CACHE_PLAN, plan)
        if done:
            log(f"continuing {out_folder}: {len(done)} of {len(source.shards)} shards already cached")
    distributed.barrier()
    to_do = [i for i in range(len(source.shards)) if i not in done]
    groups = [shard_groups(to_do[r::env.world_size], source.counts, group_sentences) for r in range(env.world_size)]
    forwards_needed = [sum(-(-sum(source.counts[i] for i in group) // teacher.batch_size) for group in per_rank)
                       for per_rank in groups]
    finished, forwards, start = 0, 0, time.perf_counter()
    for group in groups[env.rank]:
        # sentences of several shards are length-sorted together: less padding than shard by shard
        samples = [list(iter_shard_samples([source.paths()[i]], with_keys=True)) for i in group]
        embeddings = teacher.embed([text for shard in samples for _, text, _ in shard])
        forwards += -(-len(embeddings) // teacher.batch_size)
        first = 0
        for i, shard_samples in zip(group, samples):
            shard = ShardFile(out_folder / source.shards[i]["name"])
            for (key, text, _), embedding in zip(shard_samples, embeddings[first:first + len(shard_samples)].numpy()):
                shard.write(key, text, embedding)
            shard.close()
            first += len(shard_samples)
        finished += len(group)
        if env.is_main:
            log(f"rank 0: {source.shards[group[-1]]['name']} done ({finished}/{len(to_do[::env.world_size])} "
                "of this rank's shards)")
    for _ in range(max(forwards_needed) - forwards):
        teacher.padding_forward()
    distributed.barrier()
    seconds = time.perf_counter() - start
    if env.is_main:
        entries = [{"name": source.shards[i]["name"], "samples": source.counts[i],
                    "sha256": sha256_of(out_folder / source.shards[i]["name"])} for i in range(len(source.shards))]
        meta = {k: v for k, v in source.meta.items() if k != "format"}
        index = write_index(out_folder, source.total, entries, **meta, teacher_source=str(Path(source_folder).resolve()),
                            teacher={"model": str(teacher.encoder.model.name_or_path), "dim": teacher.dim,
                                     "dtype": "float16", "pooling": teacher.encoder.pooling,
                                     "normalize": teacher.encoder.normalize, "max_length": teacher.encoder.max_length,
                                     "precision": "bf16" if teacher.bf16 else "fp32", "batch_size": teacher.batch_size,
                                     "world_size": env.world_size, "seconds": round(seconds, 2),
                                     # this pass's rate; a continued pass counts only the shards it embedded
                                     "sentences_per_s": round(sum(source.counts[i] for i in to_do) / seconds, 2)})
        (out_folder / CACHE_PLAN).unlink()
        log(f"wrote {index.total} sentences with teacher embeddings in {len(entries)} shards to {out_folder} "
            f"({index.teacher['sentences_per_s']} sentences/s)")
    distributed.barrier()


def cache_plan(teacher: ZeroTeacher, source_folder) -> dict:
    """What a cache's shards depend on: finished shards are reused only under an equal plan."""
    return {"source_index_sha256": sha256_of(Path(source_folder) / INDEX),
            "teacher": str(teacher.encoder.model.name_or_path), "max_length": teacher.encoder.max_length,
            "precision": "bf16" if teacher.bf16 else "fp32"}


def _finished_shards(source, out_folder: Path, plan: dict, overwrite: bool) -> list:
    """Source shard numbers already cached whole in an unfinished `out_folder` made by the same plan."""
    plan_path = out_folder / CACHE_PLAN
    if (out_folder / INDEX).exists() and not overwrite:
        raise UserError(f"{out_folder} already holds shards; choose a new --out folder (or --overwrite)")
    if overwrite or not plan_path.is_file():
        return []
    try:
        earlier = json.loads(plan_path.read_text())
    except ValueError:
        earlier = None
    if earlier != plan:
        raise UserError(f"{out_folder} holds an unfinished cache of another source, teacher, max length or precision "
                        f"({plan_path}); choose a new --out folder (or --overwrite)")
    return [i for i, entry in enumerate(source.shards)
            if count_shard_samples(out_folder / entry["name"]) == entry["samples"]]
