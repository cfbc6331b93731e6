"""The ZeRO-3 teacher on 2 gloo ranks: partitioned parameters, unchanged embeddings, cached shards."""
import json

import numpy as np
import torch

from disco_dist.encoder import Encoder
from disco_dist.shards import iter_shard_samples, make_shards, read_index

from conftest import REPO, build_tiny_model
from dist_utils import run_on_ranks

SENTENCES = ["a man plays the guitar.", "two dogs run in the park", "the first album of the year", "a", "b c d"] * 3


def teacher_rank(rank, world_size, model_dir, ds_config):
    from disco_dist.distributed import read_env
    from disco_dist.teacher import ZeroTeacher

    teacher = ZeroTeacher(model_dir, ds_config, read_env().device, batch_size=4)
    return {"fraction": teacher.local_parameter_fraction(), "embeddings": teacher.embed(SENTENCES)}


def test_zero3_teacher_partitions_and_matches_unsharded(tmp_path):
    model_dir = build_tiny_model(tmp_path / "teacher", hidden=128, layers=2, seed=3)
    results = run_on_ranks(teacher_rank, 2, tmp_path, str(model_dir), str(REPO / "ds_configs" / "teacher_zero3.json"))
    expected = Encoder.from_pretrained(model_dir).encode(SENTENCES)
    for result in results:
        assert 0.45 < result["fraction"] < 0.6  # about 1/W (the small, persistent parameters are whole)
        torch.testing.assert_close(result["embeddings"], expected, rtol=1e-5, atol=1e-5)


def cache_rank(rank, world_size, model_dir, ds_config, source, out):
    from disco_dist.distributed import read_env
    from disco_dist.teacher import ZeroTeacher, cache_teacher_embeddings

    env = read_env()
    teacher = ZeroTeacher(model_dir, ds_config, env.device, batch_size=8)
    cache_teacher_embeddings(teacher, source, out, env, log=lambda *_: None)
    return True


def test_cache_pass_writes_fp16_embeddings_for_every_sentence(tmp_path):
    model_dir = build_tiny_model(tmp_path / "teacher", hidden=64, layers=2, seed=3)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the {i} dog plays in a park" for i in range(45)) + "\n")
    make_shards(corpus, tmp_path / "src", shard_size=10, log=lambda *_: None)  # 5 shards: uneven over 2 ranks
    run_on_ranks(cache_rank, 2, tmp_path, str(model_dir), str(REPO / "ds_configs" / "teacher_zero3.json"),
                 str(tmp_path / "src"), str(tmp_path / "cached"))
    index = read_index(tmp_path / "cached")
    assert index.counts == read_index(tmp_path / "src").counts and index.teacher["dim"] == 64
    samples = list(iter_shard_samples(index.paths()))
    texts = [t for t, _ in samples]
    assert texts == [t for t, _ in iter_shard_samples(read_index(tmp_path / "src").paths())]
    expected = Encoder.from_pretrained(model_dir).encode(texts).numpy().astype(np.float16)
    np.testing.assert_allclose(np.stack([e for _, e in samples]).astype(np.float32), expected, atol=2e-3)
    assert json.loads((tmp_path / "cached" / "index.json").read_text())["teacher"]["dtype"] == "float16"
