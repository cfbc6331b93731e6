"""The teacher-cache pass: embed every sentence of a shard folder once, into new shards with fp16 embeddings.

Consecutive shards are grouped (the same groups whatever W) and rank r embeds groups r, r+W, ... with the
teacher, in batches of a fixed sentence count or of a token budget formed within each group; under ZeRO-3 every
rank runs the same number of teacher forwards (padding ones where it has fewer), and rank 0 writes the index once
all are done. A cut-short pass continues where it stopped: each shard is renamed
into place only when whole, and a plan file says what the finished shards were made from.
"""

import json
import time
from pathlib import Path

from ..cluster import distributed
from ..cluster.resilience import InjectedFaults
from ..core.errors import UserError
from ..core.files import write_json_atomic
from ..core.profiling import WindowProfiler
from ..core.progress import Progress
from ..models.flops import mfu
from ..models.teacher import ZeroTeacher, default_token_budget
from .shards import (
    INDEX,
    ShardFile,
    ShardIndex,
    count_shard_samples,
    iter_shard_samples,
    prepare_output_folder,
    read_index,
    shard_entry,
    verified_index,
    write_index,
)
from .stream import describe

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


def cache_teacher_embeddings(
    teacher: ZeroTeacher,
    source_folder,
    out_folder,
    env,
    overwrite=False,
    log=print,
    group_sentences: int | None = None,
    token_budget: int | None = None,
    profile: tuple | None = None,
):
    """Write new shards holding each sentence with its fp16 teacher embedding; the same names and counts as
    the source. Rank r writes the shards of groups r, r+W, ...; rank 0 writes the index once every rank is done.
    With the same teacher batch size (or token budget) the shards' contents do not depend on W.

    Re-running the same command on an unfinished folder continues it: finished shards are kept (each is
    renamed into place only when whole) if the folder's plan matches this source, teacher and max length."""
    source = verified_index(read_index(source_folder), env.rank, env.world_size, "stop")
    if source.teacher is not None:
        raise UserError(f"{source_folder} already holds teacher embeddings ({source.teacher['model']})")
    out_folder = Path(out_folder)
    plan = cache_plan(teacher, source, group_sentences, token_budget)
    group_sentences = plan["sort_group"]
    done = set(_finished_shards(source, out_folder, plan, overwrite))  # every rank: a refusal stops them all
    distributed.barrier()
    if env.is_main:
        prepare_output_folder(out_folder, overwrite, keep_finished_shards=True)
        write_json_atomic(out_folder / CACHE_PLAN, plan)
        if done:
            log(f"continuing {out_folder}: {len(done)} of {len(source.shards)} shards already cached")
    distributed.barrier()
    to_do = [i for i in range(len(source.shards)) if i not in done]
    # groups are formed over all shards, whatever W and whatever is already done, so each sentence is embedded in
    # the same batch (same neighbours, same padding) by a 1-rank pass, a W-rank pass and a continued one
    pending = [
        group
        for group in shard_groups(range(len(source.shards)), source.counts, group_sentences)
        if not done.issuperset(group)
    ]
    groups = [pending[r :: env.world_size] for r in range(env.world_size)]

    def read(group):  # each shard's (key, text, _, ids) samples, and all the group's texts
        samples = [list(iter_shard_samples(source, [i], with_keys=True, with_ids=True)) for i in group]
        return samples, [text for shard in samples for _, text, _, _ in shard]

    start, forwards_before, work_before = time.perf_counter(), teacher.forwards, (teacher.tokens, teacher.flops)
    busiest = busiest_forwards(teacher, source, groups, token_budget, lambda group: read(group)[1])
    mine = sum(source.counts[i] for group in groups[env.rank] for i in group)
    progress = Progress("cache pass (rank 0)", "sentences", total=mine, log=log, enabled=env.is_main)
    pause = InjectedFaults().cache_pause
    profiler = WindowProfiler(profile, out_folder / "profile", env.rank, teacher.device, unit="sentence group")
    for number, group in enumerate(groups[env.rank], start=1):
        profiler.begin(number)
        # sentences of several shards are length-sorted together: less padding than shard by shard
        samples, texts = read(group)
        embeddings = teacher.embed(texts, progress, token_budget)
        first = 0
        for i, shard_samples in zip(group, samples):
            if i not in done:
                shard = ShardFile(out_folder / source.shards[i]["name"])
                for (key, text, _, ids), embedding in zip(  # token ids, where the source has them, kept
                    shard_samples, embeddings[first : first + len(shard_samples)].numpy()
                ):
                    shard.write(key, text, embedding, ids)
                shard.close()
            first += len(shard_samples)
        profiler.end(number, log)
        time.sleep(pause)
    progress.close()
    for _ in range(busiest - (teacher.forwards - forwards_before)):  # keep step with the others' gathers
        teacher.padding_forward()
    distributed.barrier()
    seconds = time.perf_counter() - start
    work = pass_work(teacher, work_before, seconds, env)
    if env.is_main:
        entries = [shard_entry(out_folder / entry["name"], entry["samples"]) for entry in source.shards]
        meta = {k: v for k, v in source.meta.items() if k != "format"}
        index = write_index(
            out_folder,
            source.total,
            entries,
            **meta,
            teacher_source=describe(source_folder),
            teacher={
                **teacher.describe(),
                "dtype": "float16",
                "batch_size": teacher.batch_size,
                "token_budget": token_budget,
                "sort_group": group_sentences,
                "world_size": env.world_size,
                "seconds": round(seconds, 2),
                # this pass's rate over the shards it wrote (a continued pass also re-embeds the finished shards of
                # a partly finished group: its rate reads a little low)
                "sentences_per_s": round(sum(source.counts[i] for i in to_do) / seconds, 2),
                **work,
            },
        )
        (out_folder / CACHE_PLAN).unlink()
        write_scalars(out_folder / "tensorboard", index.teacher)
        log(
            f"wrote {index.total} sentences with teacher embeddings in {len(entries)} shards to {out_folder} "
            f"({index.teacher['sentences_per_s']} sentences/s; {work['tokens']:,} real tokens, "
            f"{work['flops'] / 1e12:.4g} TFLOP, MFU {work['mfu']:.1%} of {env.world_size} x "
            f"{work['matmul_tflops']} TFLOP/s measured here)"
        )
    distributed.barrier()


def pass_work(teacher: ZeroTeacher, before: tuple, seconds: float, env) -> dict:
    """The pass's real tokens and forward FLOPs over every rank (flops.py), and on rank 0 its MFU: against rank 0's
    device's matmul rate, measured now in the teacher's dtype, times the ranks. Collective."""
    done = distributed.all_gather_objects((teacher.tokens - before[0], teacher.flops - before[1]))
    tokens, flops = sum(t for t, _ in done), sum(f for _, f in done)
    work = {"tokens": tokens, "tokens_per_s": round(tokens / seconds, 1), "flops": flops}
    if env.is_main:
        peak = teacher.matmul_rate()
        work.update(matmul_tflops=round(peak / 1e12, 3), mfu=round(mfu(flops, seconds, peak, env.world_size), 4))
    return work


def write_scalars(folder: Path, teacher: dict) -> None:
    """The pass's rates and MFU as TensorBoard scalars, in the shard folder's `tensorboard` folder."""
    import shutil

    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(folder, ignore_errors=True)  # an overwritten cache's events go with it
    with SummaryWriter(str(folder)) as writer:
        for name in ("sentences_per_s", "tokens_per_s", "mfu", "matmul_tflops", "seconds"):
            writer.add_scalar(f"cache/{name}", teacher[name], 0)


def busiest_forwards(teacher: ZeroTeacher, source: ShardIndex, groups: list, token_budget, texts) -> int:
    """The teacher forwards of the busiest rank, which under ZeRO-3 every rank runs (padding ones where it has fewer):
    with fixed batch sizes counted from the shard counts; with token budgets each rank plans its own groups
    (`texts(group)` reads them, so their shards are read twice) and the ranks exchange their counts. Unpartitioned: 0
    (no rank keeps step with another)."""
    if not teacher.partitioned:
        return 0
    if not token_budget:
        return max(sum(-(-sum(source.counts[i] for i in g) // teacher.batch_size) for g in mine) for mine in groups)
    mine = sum(len(teacher.batches(texts(group), token_budget)) for group in groups[distributed.rank()])
    return max(distributed.all_gather_objects(mine))


def resolve_token_budget(asked: int | None, batch_size_asked: bool, teacher: ZeroTeacher, out_folder, overwrite: bool):
    """The token budget of a cache pass, None for fixed batches: the one asked for (0: fixed batches); fixed batches
    where a teacher batch size was asked for; an unfinished cache's own, so that rerunning the same command continues
    it (fixed batches for a plan from before token budgets); else the teacher's default (`default_token_budget`)."""
    if asked is not None:
        return asked or None
    if batch_size_asked:
        return None
    earlier = None if overwrite else _read_plan(Path(out_folder))
    if earlier:
        return earlier["token_budget"]
    return default_token_budget(teacher.device, teacher.partitioned)


def _read_plan(out_folder: Path) -> dict | None:
    """The plan of an unfinished cache in `out_folder` (one from before token budgets: fixed batches); None where
    there is none, {} where it cannot be read (no plan equals it)."""
    try:
        plan = json.loads((out_folder / CACHE_PLAN).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    if not isinstance(plan, dict):
        return {}
    plan.setdefault("token_budget", None)
    return plan


def cache_plan(
    teacher: ZeroTeacher, source: ShardIndex, group_sentences: int | None = None, token_budget: int | None = None
) -> dict:
    """What a cache's shards depend on (the source, everything `ZeroTeacher.describe` names, the batch size or token
    budget, the sort group): finished shards are reused only under an equal plan."""
    return {
        "source_index_sha256": source.index_sha256,
        **teacher.describe(),
        "batch_size": teacher.batch_size,  # a sentence's batch-mates set its padding, so its last bits
        "token_budget": token_budget,
        # sentences length-sorted together (--sort-group): 4,096 (little padding once sorted), fewer for a small
        # corpus so that 16 groups or more share the work among the ranks; a function of the corpus, never of W
        "sort_group": group_sentences or min(4096, max(1, source.total // 16)),
    }


def _finished_shards(source, out_folder: Path, plan: dict, overwrite: bool) -> list:
    """Source shard numbers already cached whole in an unfinished `out_folder` made by the same plan."""
    if (out_folder / INDEX).exists() and not overwrite:
        raise UserError(f"{out_folder} already holds shards; choose a new --out folder (or --overwrite)")
    earlier = None if overwrite else _read_plan(out_folder)
    if earlier is None:
        return []
    if earlier != plan:
        raise UserError(
            f"{out_folder} holds an unfinished cache of another source, teacher, max length, precision, prompt, dim, "
            f"teacher batch size, token budget or sort group ({out_folder / CACHE_PLAN}); rerun with the flags that "
            "made it, or choose a new --out folder (or --overwrite)"
        )
    return [
        i
        for i, entry in enumerate(source.shards)
        if count_shard_samples(out_folder / entry["name"]) == entry["samples"]
    ]
