import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from disco_dist.core.errors import UserError
from disco_dist.core.files import sha256_of
from disco_dist.data.make_shards import make_shards
from disco_dist.data.shards import ShardFolderWriter, iter_shard_samples, read_index


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    lines = [f"sentence number {i}" for i in range(95)] + ["", "sentence number 3", "  "]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_round_trip_and_index(corpus, tmp_path):
    index = make_shards(corpus, tmp_path / "shards", shard_size=20, seed=3, log=lambda *_: None)
    assert index.counts == [20, 20, 20, 20, 15] and index.total == 95
    assert index.meta["dropped"] == {
        "empty": 2,
        "undecodable": 0,
        "bad": 0,
        "too_short": 0,
        "too_long": 0,
        "duplicate": 1,
    }
    assert index.meta["source_sha256"] == sha256_of(corpus)
    texts = [t for t, _ in iter_shard_samples(index)]
    assert sorted(texts) == sorted(f"sentence number {i}" for i in range(95))
    assert texts != [f"sentence number {i}" for i in range(95)]  # shuffled


def test_deterministic_for_a_seed(corpus, tmp_path):
    a = make_shards(corpus, tmp_path / "a", shard_size=30, seed=7, log=lambda *_: None)
    b = make_shards(corpus, tmp_path / "b", shard_size=30, seed=7, log=lambda *_: None)
    c = make_shards(corpus, tmp_path / "c", shard_size=30, seed=8, log=lambda *_: None)
    assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]  # byte-identical tars
    assert [s["sha256"] for s in a.shards] != [s["sha256"] for s in c.shards]


def test_teacher_embeddings_round_trip(tmp_path):
    writer = ShardFolderWriter(tmp_path / "t", shard_size=2)
    vectors = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    for i, v in enumerate(vectors):
        writer.write(f"s{i}", v)
    index = writer.finish(teacher={"model": "x", "dim": 8, "dtype": "float16"})
    got = list(iter_shard_samples(index))
    assert [t for t, _ in got] == ["s0", "s1", "s2"]
    np.testing.assert_array_equal(np.stack([e for _, e in got]), vectors.astype(np.float16))


def test_refuses_to_overwrite_and_reports_missing_pieces(corpus, tmp_path):
    make_shards(corpus, tmp_path / "s", shard_size=50, log=lambda *_: None)
    with pytest.raises(UserError, match="already holds shards"):
        make_shards(corpus, tmp_path / "s", shard_size=50, log=lambda *_: None)
    (tmp_path / "s" / "shard-000001.tar").unlink()
    with pytest.raises(UserError, match="shard-000001.tar is listed"):
        read_index(tmp_path / "s")
    with pytest.raises(UserError, match="index.json is missing"):
        read_index(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "index.json").write_text(json.dumps({"format": 1, "total": 0, "shards": []}))
    with pytest.raises(UserError, match="lists no shards"):
        read_index(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n")
    with pytest.raises(UserError, match="no usable sentences"):
        make_shards(blank, tmp_path / "from-blank", log=lambda *_: None)


def test_make_shards_launcher(corpus, tmp_path):
    out = tmp_path / "shards"
    cmd = [
        sys.executable,
        str(REPO / "launchers" / "make_shards.py"),
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--shard-size",
        "40",
        "--limit",
        "50",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 50 sentences in 2 shards" in result.stdout
    assert json.loads((out / "index.json").read_text())["total"] == 50
    missing = subprocess.run(cmd[:3] + [str(tmp_path / "none.txt")] + cmd[4:], capture_output=True, text=True)
    assert missing.returncode == 2 and "none.txt" in missing.stderr and "Traceback" not in missing.stderr
