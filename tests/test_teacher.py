"""The ZeRO-3 teacher on 2 gloo ranks: partitioned parameters, unchanged embeddings, cached shards."""

import json

import numpy as np
import pytest
import torch
from conftest import REPO, assert_one_line, build_tiny_model, run, run_on_ranks

from disco_dist.data.make_shards import make_shards
from disco_dist.data.shards import iter_shard_samples, read_index
from disco_dist.models.encoder import Encoder

SENTENCES = ["a man plays the guitar.", "two dogs run in the park", "the first album of the year", "a", "b c d"] * 3


def teacher_rank(rank, world_size, model_dir, ds_config, precision=None):
    from disco_dist.cluster.distributed import read_env
    from disco_dist.models.teacher import TeacherSettings, ZeroTeacher

    teacher = ZeroTeacher(TeacherSettings(model_dir, ds_config, batch_size=4, precision=precision), read_env().device)
    dtypes = {str(p.dtype) for p in teacher.encoder.model.parameters()}
    return {"fraction": teacher.local_parameter_fraction(), "embeddings": teacher.embed(SENTENCES), "dtypes": dtypes}


def test_zero3_teacher_partitions_and_matches_unsharded(tmp_path):
    model_dir = build_tiny_model(tmp_path / "teacher", hidden=128, layers=2, seed=3)
    results = run_on_ranks(teacher_rank, 2, tmp_path, str(model_dir), str(REPO / "ds_configs" / "teacher_zero3.json"))
    expected = Encoder.from_pretrained(model_dir).encode(SENTENCES)
    for result in results:
        assert 0.45 < result["fraction"] < 0.6  # about 1/W (the small, persistent parameters are whole)
        torch.testing.assert_close(result["embeddings"], expected, rtol=1e-5, atol=1e-5)


def test_a_zero3_teacher_with_its_own_dense_head_matches_the_unsharded_one(tmp_path):
    """A teacher folder with a Dense module (sentence-transformers' projection after pooling): the transformer is
    partitioned over 2 ranks, the head held whole by each; the embeddings are the head's width and unchanged."""
    model_dir = build_tiny_model(tmp_path / "body", hidden=128, layers=2, seed=3)
    torch.manual_seed(4)
    folder = Encoder.from_pretrained(model_dir).save(tmp_path / "teacher", head=torch.nn.Linear(128, 48))
    results = run_on_ranks(teacher_rank, 2, tmp_path, str(folder), str(REPO / "ds_configs" / "teacher_zero3.json"))
    expected = Encoder.from_pretrained(folder).encode(SENTENCES)
    assert expected.shape == (len(SENTENCES), 48)
    for result in results:
        assert 0.45 < result["fraction"] < 0.6
        torch.testing.assert_close(result["embeddings"], expected, rtol=1e-5, atol=1e-5)


def test_zero3_teacher_in_bf16_on_cpu_is_close_to_fp32(tmp_path):
    """--precision bf16 (2-4x faster on CPUs with AVX512-BF16): bf16 weights, embeddings within bf16 rounding."""
    model_dir = build_tiny_model(tmp_path / "teacher", hidden=128, layers=2, seed=3)
    results = run_on_ranks(
        teacher_rank, 2, tmp_path, str(model_dir), str(REPO / "ds_configs" / "teacher_zero3.json"), "bf16"
    )
    expected = Encoder.from_pretrained(model_dir).encode(SENTENCES)
    for result in results:
        assert result["dtypes"] == {"torch.bfloat16"} and result["embeddings"].dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(result["embeddings"], expected)
        assert cosine.min() > 0.999 and not torch.equal(result["embeddings"], expected)


def cache_rank(
    rank, world_size, model_dir, ds_config, source, out, group_sentences=None, replicated=False, token_budget=None
):
    from disco_dist.cluster.distributed import read_env
    from disco_dist.data.cache import cache_teacher_embeddings
    from disco_dist.models.teacher import TeacherSettings, ZeroTeacher

    env = read_env()
    teacher = ZeroTeacher(TeacherSettings(model_dir, ds_config, batch_size=8, replicated=replicated), env.device)
    cache_teacher_embeddings(
        teacher, source, out, env, log=lambda *_: None, group_sentences=group_sentences, token_budget=token_budget
    )
    return {"fraction": teacher.local_parameter_fraction(), "forwards": teacher.forwards}


def test_token_budget_batches_hold_each_sentence_once_within_the_budget(tmp_path):
    """--teacher-token-budget: longest sentences first, each batch as many as fit the budget in padded tokens (a
    sentence longer than the budget alone); every sentence once; the embeddings those of the fixed batches."""
    from disco_dist.models.teacher import TeacherSettings, ZeroTeacher

    model_dir = build_tiny_model(tmp_path / "teacher", hidden=64, layers=2, seed=3)
    settings = TeacherSettings(model_dir, REPO / "ds_configs" / "teacher_zero3.json", batch_size=4)
    teacher = ZeroTeacher(settings, torch.device("cpu"))
    sentences = [" ".join(["word"] * (1 + (7 * i) % 23)) for i in range(40)]
    lengths = teacher.encoder.token_counts(sentences)
    batches = teacher.batches(sentences, token_budget=200)
    assert sorted(i for batch in batches for i in batch) == list(range(40))
    assert [lengths[batch[0]] for batch in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)
    for batch in batches:
        assert max(lengths[i] for i in batch) == lengths[batch[0]]
        assert len(batch) == 1 or lengths[batch[0]] * len(batch) <= 200
    assert max(map(len, batches)) > 4 and len(batches[0]) < 4  # short ones share a batch, long ones fewer
    forwards = teacher.forwards
    torch.testing.assert_close(teacher.embed(sentences, token_budget=200), teacher.embed(sentences), atol=1e-5, rtol=0)
    assert teacher.forwards - forwards == len(batches) + 10


@pytest.mark.timeout(180)  # a broken count exchange hangs the gathers
def test_a_zero3_cache_pass_with_a_token_budget_keeps_the_ranks_in_step_and_equals_one_rank(tmp_path):
    """Token-budget batches differ in count between the ranks' shards; under ZeRO-3 the ranks exchange their counts
    and the one with fewer runs padding forwards (else the gathers hang). The shards equal a 1-rank pass's, byte for
    byte, and the index records the budget."""
    model_dir = build_tiny_model(tmp_path / "teacher", hidden=64, layers=2, seed=3)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the {i} dog plays" + " in a park" * (i % 9) for i in range(45)) + "\n")
    make_shards(corpus, tmp_path / "src", shard_size=10, log=lambda *_: None)  # 5 shards: uneven over 2 ranks
    config, indexes, results = str(REPO / "ds_configs" / "teacher_zero3.json"), {}, {}
    for ranks in (2, 1):
        out = tmp_path / f"cached-{ranks}"
        results[ranks] = run_on_ranks(
            cache_rank, ranks, tmp_path, str(model_dir), config, str(tmp_path / "src"), str(out), None, False, 40
        )
        indexes[ranks] = json.loads((out / "index.json").read_text())
    assert max(r["fraction"] for r in results[2]) < 0.7 and indexes[2]["teacher"]["token_budget"] == 40
    # both ranks ran the busier one's count; together more than the 1-rank pass's batches: one rank padded
    assert results[2][0]["forwards"] == results[2][1]["forwards"]
    assert 2 * results[2][0]["forwards"] > results[1][0]["forwards"]
    assert indexes[2]["shards"] == indexes[1]["shards"]  # names, counts, sha256


def test_a_replicated_teacher_holds_it_all_and_caches_what_zero3_caches(tmp_path):
    """--teacher-replicated: no partitions, no gathers (each rank embeds its own shards alone); same embeddings."""
    model_dir = build_tiny_model(tmp_path / "teacher", hidden=64, layers=2, seed=3)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the {i} dog plays in a park" for i in range(45)) + "\n")
    make_shards(corpus, tmp_path / "src", shard_size=10, log=lambda *_: None)  # 5 shards: uneven over 2 ranks
    config = str(REPO / "ds_configs" / "teacher_zero3.json")
    embeddings, fractions = {}, {}
    for replicated in (False, True):
        out = tmp_path / f"cached-{replicated}"
        fractions[replicated] = run_on_ranks(
            cache_rank, 2, tmp_path, str(model_dir), config, str(tmp_path / "src"), str(out), None, replicated
        )
        embeddings[replicated] = np.stack([e for _, e in iter_shard_samples(read_index(out))])
    assert [r["fraction"] for r in fractions[True]] == [1.0, 1.0] and max(r["fraction"] for r in fractions[False]) < 0.7
    np.testing.assert_array_equal(embeddings[True], embeddings[False])


def test_cache_pass_writes_fp16_embeddings_for_every_sentence(tmp_path):
    model_dir = build_tiny_model(tmp_path / "teacher", hidden=64, layers=2, seed=3)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the {i} dog plays in a park" for i in range(45)) + "\n")
    make_shards(corpus, tmp_path / "src", shard_size=10, log=lambda *_: None)  # 5 shards: uneven over 2 ranks
    run_on_ranks(
        cache_rank,
        2,
        tmp_path,
        str(model_dir),
        str(REPO / "ds_configs" / "teacher_zero3.json"),
        str(tmp_path / "src"),
        str(tmp_path / "cached"),
    )
    index = read_index(tmp_path / "cached")
    assert index.counts == read_index(tmp_path / "src").counts and index.teacher["dim"] == 64
    samples = list(iter_shard_samples(index))
    texts = [t for t, _ in samples]
    assert texts == [t for t, _ in iter_shard_samples(read_index(tmp_path / "src"))]
    expected = Encoder.from_pretrained(model_dir).encode(texts).numpy().astype(np.float16)
    np.testing.assert_allclose(np.stack([e for _, e in samples]).astype(np.float32), expected, atol=2e-3)
    assert json.loads((tmp_path / "cached" / "index.json").read_text())["teacher"]["dtype"] == "float16"


@pytest.mark.slow
def test_unfinished_cache_continues_and_keeps_finished_shards(tmp_path):
    """A cache pass killed part-way is continued by re-running it: finished shards are kept as they are,
    the half-written one is redone, and the result equals an uninterrupted pass byte for byte (groups of 2 shards:
    shard 0 finished and shard 1 not is a partly finished group, embedded together again as before)."""
    import shutil

    from disco_dist.data.cache import CACHE_PLAN

    model_dir = build_tiny_model(tmp_path / "teacher", hidden=64, layers=2, seed=3)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the {i} dog plays in a park" for i in range(45)) + "\n")
    make_shards(corpus, tmp_path / "src", shard_size=10, log=lambda *_: None)
    ds_config = str(REPO / "ds_configs" / "teacher_zero3.json")
    run_on_ranks(cache_rank, 2, tmp_path, str(model_dir), ds_config, str(tmp_path / "src"), str(tmp_path / "whole"), 20)
    whole = json.loads((tmp_path / "whole" / "index.json").read_text())

    # what a killed pass leaves: its plan, two finished shards, one half-written, no index
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("shard-000000.tar", "shard-000003.tar"):
        shutil.copy(tmp_path / "whole" / name, partial / name)
    (partial / "shard-000001.tar.tmp").write_bytes(b"half")
    kept = {name: (partial / name).stat().st_mtime_ns for name in ("shard-000000.tar", "shard-000003.tar")}
    run_on_ranks(plan_only_rank, 1, tmp_path, str(model_dir), ds_config, str(tmp_path / "src"), str(partial), 20)
    plan = json.loads((partial / CACHE_PLAN).read_text())
    del plan["token_budget"]  # as plans were written before token budgets: fixed batches, still continued
    (partial / CACHE_PLAN).write_text(json.dumps(plan))
    run_on_ranks(cache_rank, 1, tmp_path, str(model_dir), ds_config, str(tmp_path / "src"), str(partial), 20)

    assert json.loads((partial / "index.json").read_text())["shards"] == whole["shards"]  # names, counts, sha256
    assert whole["teacher"]["sort_group"] == 20  # the sort group asked for, recorded
    assert {name: (partial / name).stat().st_mtime_ns for name in kept} == kept
    assert not list(partial.glob("*.tmp")) and not (partial / CACHE_PLAN).exists()

    # an unfinished folder of another plan (here: another max length) is refused, not mixed in
    other = tmp_path / "other"
    other.mkdir()
    (other / CACHE_PLAN).write_text(json.dumps({"source_index_sha256": "x", "teacher": "y", "max_length": 7}))
    assert_one_line(
        run("cache_teacher.py", "--shards", tmp_path / "src", "--out", other, "--teacher", model_dir),
        str(other),
        "unfinished cache of another source",
    )


def test_a_cut_short_cache_from_before_token_budgets_continues_with_the_same_command(tmp_path):
    """cache_teacher.py's default is now a token budget (a CPU teacher, one rank), yet rerunning the command that made
    an unfinished cache continues it as it was planned: a plan from before token budgets, with fixed batches."""
    import shutil

    from disco_dist.data.cache import CACHE_PLAN, cache_plan
    from disco_dist.models.teacher import TeacherSettings, ZeroTeacher

    model_dir = build_tiny_model(tmp_path / "teacher", hidden=64, layers=2, seed=3).resolve()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the {i} dog plays" + " in a park" * (i % 9) for i in range(45)) + "\n")
    make_shards(corpus, tmp_path / "src", shard_size=10, log=lambda *_: None)
    src, fixed, default, partial = (tmp_path / name for name in ("src", "fixed", "default", "partial"))
    for out, extra in ((fixed, ("--teacher-token-budget", 0)), (default, ())):
        result = run("cache_teacher.py", "--shards", src, "--out", out, "--teacher", model_dir, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
    index = {out: json.loads((out / "index.json").read_text()) for out in (fixed, default)}
    assert index[fixed]["teacher"]["token_budget"] is None and index[default]["teacher"]["token_budget"] == 1024

    partial.mkdir()  # what a pass cut short before token budgets leaves: its plan (no budget in it), a finished shard
    shutil.copy(fixed / "shard-000000.tar", partial / "shard-000000.tar")
    teacher = ZeroTeacher(TeacherSettings(model_dir, REPO / "ds_configs" / "teacher_zero3.json"), torch.device("cpu"))
    plan = cache_plan(teacher, read_index(src))
    del plan["token_budget"]
    (partial / CACHE_PLAN).write_text(json.dumps(plan))
    result = run("cache_teacher.py", "--shards", src, "--out", partial, "--teacher", model_dir)
    assert result.returncode == 0 and "continuing" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    continued = json.loads((partial / "index.json").read_text())
    assert continued["shards"] == index[fixed]["shards"] and continued["teacher"]["token_budget"] is None


def plan_only_rank(rank, world_size, model_dir, ds_config, source, out, group_sentences):
    """Write the plan file a cache pass of this source and teacher starts with, and nothing else."""
    from pathlib import Path

    from disco_dist.cluster.distributed import read_env
    from disco_dist.core.files import write_json_atomic
    from disco_dist.data.cache import CACHE_PLAN, cache_plan
    from disco_dist.data.shards import read_index
    from disco_dist.models.teacher import TeacherSettings, ZeroTeacher

    teacher = ZeroTeacher(TeacherSettings(model_dir, ds_config, batch_size=8), read_env().device)
    write_json_atomic(Path(out) / CACHE_PLAN, cache_plan(teacher, read_index(source), group_sentences))
    return True


def test_the_cache_token_budget_is_the_one_asked_else_the_unfinished_plan_s_else_the_default(tmp_path):
    """What `cache_teacher.py` batches by: --teacher-token-budget wins (0: fixed batches); --teacher-batch-size means
    fixed batches; an unfinished cache keeps its own plan's budget (so the same command continues it) unless
    --overwrite; else 1,024 for a CPU teacher that is not partitioned and fixed batches under ZeRO-3."""
    from types import SimpleNamespace

    from disco_dist.data.cache import CACHE_PLAN, resolve_token_budget

    cpu, zero3 = (SimpleNamespace(device=torch.device("cpu"), partitioned=p) for p in (False, True))
    assert resolve_token_budget(0, False, cpu, tmp_path, False) is None
    assert resolve_token_budget(300, True, zero3, tmp_path, False) == 300
    assert resolve_token_budget(None, True, cpu, tmp_path, False) is None
    assert resolve_token_budget(None, False, cpu, tmp_path, False) == 1024
    assert resolve_token_budget(None, False, zero3, tmp_path, False) is None
    (tmp_path / CACHE_PLAN).write_text(json.dumps({"token_budget": 512}))
    assert resolve_token_budget(None, False, cpu, tmp_path, False) == 512
    assert resolve_token_budget(None, False, cpu, tmp_path, True) == 1024
    (tmp_path / CACHE_PLAN).write_text(json.dumps({"sort_group": 16}))  # a plan from before token budgets
    assert resolve_token_budget(None, False, cpu, tmp_path, False) is None


def test_an_online_teacher_embeds_a_resumed_run_s_batches_in_the_uninterrupted_run_s_groups():
    """The groups of student batches the online teacher embeds together are fixed by the batches' places in the
    epoch: a run resumed at batch 10 (groups of 4) embeds batches 8-11 together, as the uninterrupted run did, and
    trains from batch 10 on. (A teacher's embedding of a sentence depends at the last bit on the other sentences
    of its forward; regrouped, a resumed run trained on other targets and ended 1e-6 away from the uninterrupted
    run's weights.)"""
    from types import SimpleNamespace

    from disco_dist.train.stages import Distill

    class Loader:
        def batches(self, epoch, start):
            for number in range(start, 15):  # 15 batches: the epoch's last group is short
                yield {"texts": [f"{epoch}.{number}.{i}" for i in range(2)], "sentences": 2, "number": number}

    class Teacher:
        batch_size = 8  # 4 student batches of 2 a forward

        def __init__(self):
            self.calls, self.flops = [], 0.0

        def embed(self, texts, on_device=False):  # as a real teacher's, an embedding depends on the forward's others
            self.calls.append(tuple(texts))
            self.flops += 10.0 * len(texts)
            together = float(sum(map(ord, "".join(texts))))
            return torch.tensor([[float(sum(map(ord, text))), together] for text in texts])

    def run(start):
        settings = SimpleNamespace(run=SimpleNamespace(batch_size=2))
        stage = SimpleNamespace(teacher=Teacher(), settings=settings, loader=Loader())
        stage._embed_group = lambda group, skip=0: Distill._embed_group(stage, group, skip)
        batches = list(Distill._with_online_teacher(stage, 0, start))
        return stage.teacher.calls, batches

    full_calls, full = run(0)
    assert [len(call) for call in full_calls] == [8, 8, 8, 6]
    assert all(b["teacher_flops"] == 20.0 for b in full)  # each batch's share of its forward's FLOPs (its 2 sentences)
    for start in (10, 12, 13, 14):
        calls, resumed = run(start)
        assert calls == full_calls[start // 4 :], start  # the same forwards, from the group holding `start`
        assert [b["number"] for b in resumed] == list(range(start, 15))
        for got, want in zip(resumed, full[start:]):
            assert got["texts"] == want["texts"] and torch.equal(got["teacher"], want["teacher"])
