"""Decoder LLM embedders as teachers (Qwen3-Embedding's shape: last-token pooling, an appended end-of-text
token, left or right padding, an instruction prompt, Matryoshka truncation), checked against the reference
implementation, sentence-transformers, on the same tiny random weights: one process, ZeRO-3 on 2 ranks, and
the cache pass. Encoders with mean and CLS pooling and a prompt likewise."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PROBE_SENTENCES, PROMPT, REPO, build_tiny_decoder, build_tiny_model, run_on_ranks

from disco_dist.core.errors import UserError
from disco_dist.data.make_shards import make_shards
from disco_dist.data.shards import iter_shard_samples, read_index
from disco_dist.models.encoder import Encoder

DS_CONFIG = str(REPO / "ds_configs" / "teacher_zero3.json")


def reference(folder, sentences=PROBE_SENTENCES, **encode_kwargs):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return model.encode(sentences, convert_to_tensor=True, batch_size=4, **encode_kwargs).float().cpu()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_last_token_pooling_with_the_default_prompt_equals_sentence_transformers(tmp_path, padding_side):
    folder = build_tiny_decoder(tmp_path / "decoder", padding_side=padding_side)
    encoder = Encoder.from_pretrained(folder)
    assert (encoder.pooling, encoder.prompt, encoder.max_length) == ("lasttoken", PROMPT, 24)
    torch.testing.assert_close(encoder.encode(PROBE_SENTENCES, batch_size=4), reference(folder), rtol=0, atol=1e-5)


def test_a_given_prompt_and_a_truncated_dimension_equal_sentence_transformers(tmp_path):
    """--teacher-prompt replaces the folder's default prompt; --teacher-dim keeps the first N dimensions and
    re-normalises them (sentence-transformers' truncate_dim alone does not re-normalise)."""
    folder = build_tiny_decoder(tmp_path / "decoder")
    encoder = Encoder.from_pretrained(folder, prompt="Query: ", truncate_dim=16)
    expected = F.normalize(reference(folder, prompt="Query: ")[:, :16], dim=-1)
    assert encoder.dim == 16
    torch.testing.assert_close(encoder.encode(PROBE_SENTENCES, batch_size=4), expected, rtol=0, atol=1e-5)
    no_prompt = Encoder.from_pretrained(folder, prompt="")
    torch.testing.assert_close(no_prompt.encode(PROBE_SENTENCES), reference(folder, prompt=""), rtol=0, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encoders_with_a_prompt_equal_sentence_transformers(tmp_path, pooling):
    """The prompt's tokens are part of the input and, for mean pooling, part of the average, as in
    sentence-transformers (include_prompt true)."""
    base = Encoder.from_pretrained(build_tiny_model(tmp_path / "bert", hidden=32, layers=2), pooling=pooling)
    folder = base.save(tmp_path / "saved")
    encoder = Encoder.from_pretrained(folder, prompt="query: ")
    torch.testing.assert_close(encoder.encode(PROBE_SENTENCES), reference(folder, prompt="query: "), rtol=0, atol=1e-5)


def zero3_rank(rank, world_size, folder, dim, config):
    from disco_dist.cluster.distributed import read_env
    from disco_dist.models.teacher import TeacherSettings, ZeroTeacher

    linear = F.linear
    teacher = ZeroTeacher(
        TeacherSettings(folder, str(REPO / "ds_configs" / config), batch_size=4, dim=dim), read_env().device
    )
    return {
        "fraction": teacher.local_parameter_fraction(),
        "embeddings": teacher.embed(PROBE_SENTENCES),
        "linear_untouched": F.linear is linear,
    }


@pytest.mark.parametrize(
    "ranks, dim, config",
    [
        (2, None, "teacher_zero3.json"),
        (2, 32, "teacher_zero3.json"),
        (2, None, "teacher_zero3_prefetch.json"),
        (3, None, "teacher_zero3.json"),  # padded last partitions, embedding rows split between ranks
    ],
)
def test_zero3_decoder_teacher_equals_sentence_transformers(tmp_path, capfd, ranks, dim, config):
    folder = build_tiny_decoder(tmp_path / "decoder")
    expected = reference(folder)
    if dim:
        expected = F.normalize(expected[:, :dim], dim=-1)
    for result in run_on_ranks(zero3_rank, ranks, tmp_path, str(folder), dim, config):
        assert abs(result["fraction"] - 1 / ranks) < 0.1  # partitioned: about 1/W of the elements on each rank
        # zero.Init swaps torch's F.linear for one that rounds differently; the teacher puts it back, so a student
        # in the same process (online distillation) computes as in a plain one
        assert result["linear_untouched"]
        torch.testing.assert_close(result["embeddings"], expected, rtol=0, atol=1e-5)
    assert "loading through transformers" not in capfd.readouterr().out  # each rank read its own share


def test_a_checkpoint_ranks_cannot_read_by_parts_falls_back_to_transformers_loading(tmp_path, capfd):
    """A .bin checkpoint: each rank cannot read its own share, so transformers loads it (rank 0 reads it whole),
    says so in one line on rank 0, and the embeddings are the same."""
    from safetensors.torch import load_file

    folder = build_tiny_decoder(tmp_path / "decoder")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    expected = reference(folder)
    for result in run_on_ranks(zero3_rank, 2, tmp_path, str(folder), None, "teacher_zero3.json"):
        torch.testing.assert_close(result["embeddings"], expected, rtol=0, atol=1e-5)
    lines = [line for line in capfd.readouterr().out.splitlines() if "loading through transformers" in line]
    assert lines == [
        f"teacher {folder}: no safetensors checkpoint; loading through transformers instead (rank 0 "
        "reads the whole checkpoint)"
    ]


def cache_rank(rank, world_size, folder, source, out):
    from disco_dist.cluster.distributed import read_env
    from disco_dist.data.cache import cache_teacher_embeddings
    from disco_dist.models.teacher import TeacherSettings, ZeroTeacher

    env = read_env()
    teacher = ZeroTeacher(TeacherSettings(folder, DS_CONFIG, batch_size=4), env.device)
    cache_teacher_embeddings(teacher, source, out, env, log=lambda *_: None, group_sentences=10)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_cache_pass_on_two_ranks_equals_sentence_transformers_and_a_one_rank_pass(tmp_path, kind):
    """The cache stores fp16: every stored embedding is sentence-transformers' fp32 one rounded to fp16. Each rank
    embeds its own groups of shards, and the shards hold the same bytes as a 1-rank pass's."""
    folder = build_tiny_decoder(tmp_path / kind) if kind == "decoder" else build_tiny_model(tmp_path / kind)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(s for s in PROBE_SENTENCES if s.strip())
        + "\n"
        + "\n".join(f"the {i} dog plays in a park with {i % 5} children" for i in range(25))
        + "\n"
    )
    make_shards(corpus, tmp_path / "src", shard_size=7, log=lambda *_: None)
    run_on_ranks(cache_rank, 2, tmp_path, str(folder), str(tmp_path / "src"), str(tmp_path / "cached"))
    index = read_index(tmp_path / "cached")
    texts, stored = zip(*iter_shard_samples(index))
    expected = F.normalize(reference(folder, list(texts)), dim=-1).numpy()  # a plain folder: disco-dist normalises
    np.testing.assert_allclose(np.stack(stored).astype(np.float32), expected, rtol=0, atol=1e-3)
    teacher = json.loads((tmp_path / "cached" / "index.json").read_text())["teacher"]
    if kind == "decoder":
        assert (teacher["pooling"], teacher["prompt"], teacher["dim"]) == ("lasttoken", PROMPT, 64)
    run_on_ranks(cache_rank, 1, tmp_path, str(folder), str(tmp_path / "src"), str(tmp_path / "one-rank"))
    for name in [entry["name"] for entry in index.shards]:
        assert (tmp_path / "one-rank" / name).read_bytes() == (tmp_path / "cached" / name).read_bytes(), name


@pytest.mark.parametrize(
    "change, message",
    [
        ({"1_Pooling/config.json": {"embedding_dimension": 64, "pooling_mode": "max"}}, "pooling ['max']"),
        (
            {
                "1_Pooling/config.json": {
                    "embedding_dimension": 64,
                    "pooling_mode": "lasttoken",
                    "include_prompt": False,
                }
            },
            "include_prompt false",
        ),
        (
            {"config_sentence_transformers.json": {"prompts": {"query": "q: "}, "default_prompt_name": "passage"}},
            "default_prompt_name 'passage'",
        ),
        (
            {
                "modules.json": [
                    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                    {"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"},
                ]
            },
            "module(s) LayerNorm",
        ),
        (
            {
                "modules.json": [
                    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                    {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
                ]
            },
            "2_Dense: not a readable Dense module",
        ),
    ],
)
def test_a_setting_disco_dist_cannot_honour_is_one_clear_error(tmp_path, change, message):
    folder = build_tiny_decoder(tmp_path / "decoder")
    for name, content in change.items():
        (folder / name).write_text(json.dumps(content))
    with pytest.raises(UserError, match=re.escape(message)):
        Encoder.from_pretrained(folder)


def test_a_truncation_wider_than_the_model_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="a truncation to 65 dimensions: the model's embeddings have 64"):
        Encoder.from_pretrained(build_tiny_decoder(tmp_path / "decoder"), truncate_dim=65)


@pytest.mark.slow
def test_launchers_run_end_to_end_with_a_decoder_teacher(tmp_path):
    """What a user runs: the cache pass (one process, a teacher dim of 32) and online distillation on 2 ranks
    (the ZeRO-3 decoder teacher with a prompt of its own) into a small BERT student through a projection."""
    import os
    import subprocess
    import sys

    from disco_dist.cluster.distributed import deepspeed_command

    folder = build_tiny_decoder(tmp_path / "decoder")
    student = build_tiny_model(tmp_path / "student", hidden=32, layers=2)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the {i} dog plays in a park with {i % 5} children" for i in range(96)) + "\n")
    make_shards(corpus, tmp_path / "shards", shard_size=24, log=lambda *_: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cached = tmp_path / "cached"
    cache = subprocess.run(
        [
            sys.executable,
            str(REPO / "launchers" / "cache_teacher.py"),
            "--shards",
            str(tmp_path / "shards"),
            "--out",
            str(cached),
            "--teacher",
            str(folder),
            "--teacher-dim",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert cache.returncode == 0, cache.stderr[-3000:]
    assert read_index(cached).teacher["dim"] == 32 and "wrote 96 sentences" in cache.stdout
    run_dir = tmp_path / "online"
    distill = subprocess.run(
        deepspeed_command(
            2,
            REPO / "launchers" / "distill.py",
            "--shards",
            tmp_path / "shards",
            "--student",
            student,
            "--teacher",
            folder,
            "--teacher-mode",
            "online",
            "--teacher-prompt",
            "Query: ",
            "--run-dir",
            run_dir,
            "--batch-size",
            8,
            "--max-steps",
            4,
            "--queue-size",
            32,
            "--log-every",
            2,
            "--head-init",
            "random",
            "--progress",
            "off",
        ),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert distill.returncode == 0 and "finished: 4 steps" in distill.stdout, distill.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["teacher_prompt"] == "Query: " and config["teacher_mode"] == "online"
