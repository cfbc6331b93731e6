"""Shards streamed from a server: a real HTTP server on 127.0.0.1 (one that cuts connections part-way, too),
2 gloo ranks, the same batches as from the local folder, exact resume, a changed shard, a dead server."""

import shutil

import pytest
from conftest import assert_one_line, run, run_on_ranks
from shard_server import ShardServer

from disco_dist.errors import RankError, UserError
from disco_dist.loader import ShardBatches
from disco_dist.shards import ShardFolderWriter, iter_shard_samples, read_index, verified_index


def texts_only(texts, teacher):
    return {"texts": texts}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """10 shards of 30 sentences of different lengths."""
    writer = ShardFolderWriter(tmp_path_factory.mktemp("served") / "shards", shard_size=30)
    for n in range(300):
        writer.write("word " * (n % 13) + f"sentence {n}")
    return writer.finish().folder


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setenv("DISCO_SHARD_RETRIES", "2")


def batches_of(location, rank, world_size, epochs=(0, 1), start=0, bad_shards="stop"):
    index = verified_index(read_index(location), rank, world_size, bad_shards)
    loader = ShardBatches(index, 8, rank, world_size, texts_only, seed=3, shuffle_buffer=40, length_bucket=4)
    return {epoch: list(loader.batches(epoch, start)) for epoch in epochs}, index.skipped


def same_batches_rank(rank, world_size, local, url):
    """Both ranks: the batches from the server equal those from the folder, from the start and resumed."""
    from_folder, _ = batches_of(local, rank, world_size)
    from_server, _ = batches_of(url, rank, world_size)
    resumed, _ = batches_of(url, rank, world_size, epochs=(1,), start=3)
    return from_folder, from_server, resumed


def test_two_ranks_stream_the_same_batches_from_a_server_that_cuts_connections(shards, tmp_path):
    with ShardServer(shards.parent, cut={"shard-000002.tar": 1, "shard-000007.tar": 2}) as server:
        results = run_on_ranks(same_batches_rank, 2, tmp_path, str(shards), f"{server.url}/shards")
        gets = dict(server.gets)
    for from_folder, from_server, resumed in results:
        assert from_server == from_folder and sum(map(len, from_folder.values())) > 0
        assert resumed[1] == from_folder[1][3:]  # exact resume: a checkpoint's (epoch, batch) position
    assert results[0][0][0] != results[1][0][0]  # the ranks read different shards
    # every shard read once per epoch and reader (3 reads: two epochs, then the resumed one); a cut
    # shard once more per cut
    assert gets["index.json"] == 2 * 2  # two readers on each rank
    assert gets["shard-000002.tar"] == 3 + 1 and gets["shard-000007.tar"] == 3 + 2 and gets["shard-000000.tar"] == 3


def test_a_pipe_command_serves_the_same_samples(shards):
    local = list(iter_shard_samples(read_index(shards), with_keys=True))
    piped = list(iter_shard_samples(read_index(f"pipe:cat {shards}/{{name}}"), with_keys=True))
    assert [(k, t) for k, t, _ in piped] == [(k, t) for k, t, _ in local] and len(local) == 300


@pytest.fixture
def changed(shards, tmp_path):
    """A copy of the folder whose shard 4 was replaced by shard 1 (a valid tar) after indexing."""
    folder = tmp_path / "served" / "shards"
    shutil.copytree(shards, folder)
    shutil.copy(folder / "shard-000001.tar", folder / "shard-000004.tar")
    return folder


def skip_rank(rank, world_size, url):
    (batches, skipped) = batches_of(url, rank, world_size, bad_shards="skip")
    return batches, skipped


def test_a_changed_shard_stops_the_reader_or_is_skipped_on_both_ranks(changed, tmp_path):
    with ShardServer(changed.parent) as server:
        url = f"{server.url}/shards"
        with pytest.raises(RankError, match=r"shard-000004.tar does not match index.json .*changed since"):
            list(iter_shard_samples(read_index(url), numbers=[3, 4]))
        results = run_on_ranks(skip_rank, 2, tmp_path, url)
    (batches0, skipped0), (batches1, skipped1) = results
    assert skipped0 == skipped1 == ["shard-000004.tar"]
    assert len(batches0[0]) == len(batches1[0]) > 0  # equal batch counts: no rank waits for the other
    seen = {t for batches in (batches0, batches1) for batch in batches[0] for t in batch["texts"]}
    assert not any(f"sentence {n}" in seen for n in range(120, 150))  # nothing of the changed shard


def test_a_connection_cut_every_time_ends_in_one_line_naming_the_shard(shards):
    with ShardServer(shards.parent, cut={"shard-000005.tar": 99}) as server:
        index = read_index(f"{server.url}/shards")
        with pytest.raises(RankError, match=r"could not read http://.*/shards/shard-000005.tar in 3 tries"):
            list(iter_shard_samples(index, numbers=[5]))
        assert server.gets["shard-000005.tar"] == 3


def test_a_missing_index_or_dead_server_is_one_line(shards, tmp_path):
    with ShardServer(shards.parent) as server:
        with pytest.raises(UserError, match=r"could not read http://.*/nothing/index.json: HTTP 404"):
            read_index(f"{server.url}/nothing")
        dead = server.url
    with pytest.raises(UserError, match=r"could not read http://127.0.0.1:\d+/shards/index.json in 3 tries"):
        read_index(f"{dead}/shards")
    with pytest.raises(UserError, match=r"must name the file it prints as \{name\}"):
        read_index("pipe:cat index.json")
    result = run(
        "cache_teacher.py", "--shards", f"{dead}/shards", "--out", tmp_path / "out", env={"DISCO_SHARD_RETRIES": "0"}
    )
    assert_one_line(result, f"could not read {dead}/shards/index.json in 1 tries", "check the server")
