"""Shards streamed from a server: a real HTTP server on 127.0.0.1 (one that cuts connections part-way, too),
2 gloo ranks, the same batches as from the local folder, exact resume, a changed shard, a dead server."""

import shutil
import sys

import pytest
from conftest import assert_one_line, run, run_on_ranks
from shard_server import ShardServer

from disco_dist.core.errors import RankError, UserError
from disco_dist.data.loader import ShardBatches
from disco_dist.data.shards import ShardFolderWriter, iter_shard_samples, read_index, verified_index


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


@pytest.mark.parametrize("chunked", [False, True], ids=["announced", "chunked"])
def test_a_server_that_sends_more_than_the_index_records_is_cut_off_and_named(shards, monkeypatch, chunked):
    """Memory stays bounded by the size index.json records: a longer response (announced or not) is read no further
    than that, retried as a broken transfer, then reported in one line naming the shard."""
    from types import SimpleNamespace

    import disco_dist.data.stream as stream

    held = []
    monkeypatch.setattr(stream, "CHUNK", 4096)  # so a response's blocks show how far it was read
    real = stream.hashlib.sha256

    class Counting:
        def __init__(self):
            self.inner, self.bytes = real(), 0
            held.append(self)

        def update(self, block):
            self.bytes += len(block)
            self.inner.update(block)

        def hexdigest(self):
            return self.inner.hexdigest()

    monkeypatch.setattr(stream, "hashlib", SimpleNamespace(sha256=Counting))  # stream's hashing only
    with ShardServer(shards.parent, pad={"shard-000004.tar": 1 << 20}, chunked=chunked) as server:
        index = read_index(f"{server.url}/shards")
        size = index.shards[4]["bytes"]
        held.clear()
        with pytest.raises(RankError) as caught:
            list(iter_shard_samples(index, numbers=[4]))
        assert server.gets["shard-000004.tar"] == 3  # retried, as a cut transfer is
    message = str(caught.value)
    assert "shard-000004.tar in 3 tries" in message and f"than the {size:,} bytes expected" in message, message
    assert "\n" not in message and all(h.bytes <= size + 1 for h in held), [h.bytes for h in held]


def test_a_shard_over_the_size_cap_is_refused_before_it_is_read(shards, monkeypatch):
    with ShardServer(shards.parent) as server:
        index = read_index(f"{server.url}/shards")
        monkeypatch.setenv("DISCO_SHARD_MAX_BYTES", str(index.shards[0]["bytes"] - 1))
        with pytest.raises(
            RankError, match=r"shard-000000.tar is [\d,]+ bytes by index.json, over DISCO_SHARD_MAX_BYTES"
        ):
            list(iter_shard_samples(index, numbers=[0]))
        assert server.gets["shard-000000.tar"] == 0


@pytest.mark.parametrize("name", ["../shards/shard-000000.tar", "http://elsewhere.example/x.tar", "..", "a/b.tar"])
def test_an_index_whose_shard_names_leave_its_folder_is_refused(shards, tmp_path, name):
    import json

    folder = tmp_path / "lying"
    shutil.copytree(shards, folder)
    raw = json.loads((folder / "index.json").read_text())
    raw["shards"][0]["name"] = name
    (folder / "index.json").write_text(json.dumps(raw))
    with ShardServer(tmp_path) as server:
        for where in (folder, f"{server.url}/lying"):
            with pytest.raises(UserError, match="which leaves the shard folder"):
                read_index(where)


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


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    from conftest import build_tiny_run_inputs

    from disco_dist.data.sts import read_sts_task

    pairs = read_sts_task("STSBenchmark", split="train")
    unique = list(dict.fromkeys(s.strip() for s in pairs.sentences1 + pairs.sentences2))
    root, student, teacher, _ = build_tiny_run_inputs(tmp_path_factory.mktemp("remote"), unique[:1200], 100)
    return root, student, teacher


def distill_from(shards, inputs, run_dir, *extra):
    from test_train import distill_args, launch

    root, student, teacher = inputs
    args = distill_args(root, student, teacher, run_dir, "--max-steps", 12, "--sample-log", *extra)
    args[args.index("--shards") + 1] = shards
    return launch("distill.py", args, timeout=400)


@pytest.mark.slow
def test_deepspeed_two_ranks_train_from_a_server_as_from_the_folder(run_inputs, tmp_path):
    """`deepspeed launchers/distill.py --shards http://...` on 2 ranks through cut connections: the same batches
    (sample logs), losses and weights as from the local folder; a shard changed on the server stops the run in one
    line naming it; the teacher-cache pass reads a served folder into the same bytes."""
    from safetensors.torch import load_file

    from disco_dist.train.metrics import read_sample_logs

    root = run_inputs[0]
    local = distill_from(root / "shards", run_inputs, tmp_path / "local")
    assert local.returncode == 0, local.stderr[-3000:]
    with ShardServer(root, cut={"shard-000002.tar": 1, "shard-000009.tar": 1}) as server:
        served = distill_from(f"{server.url}/shards", run_inputs, tmp_path / "served")
        assert served.returncode == 0, served.stderr[-3000:]
        assert server.gets["shard-000002.tar"] >= 2 and "try 2 of 3" in served.stdout + served.stderr
        cache = run(
            "cache_teacher.py",
            "--shards",
            f"{server.url}/shards",
            "--out",
            tmp_path / "cached",
            "--teacher",
            run_inputs[2],
            "--teacher-batch-size",
            32,
        )
        assert cache.returncode == 0, cache.stderr[-3000:]
    assert read_sample_logs(tmp_path / "served") == read_sample_logs(tmp_path / "local")
    weights = [load_file(next((tmp_path / r / "final").glob("*.safetensors"))) for r in ("local", "served")]
    assert all(torch_equal(weights[0][k], weights[1][k]) for k in weights[0])
    local_cache = run(
        "cache_teacher.py",
        "--shards",
        root / "shards",
        "--out",
        tmp_path / "cached-local",
        "--teacher",
        run_inputs[2],
        "--teacher-batch-size",
        32,
    )
    assert local_cache.returncode == 0
    assert shard_digests(tmp_path / "cached") == shard_digests(tmp_path / "cached-local")

    changed = tmp_path / "changed" / "shards"
    shutil.copytree(root / "shards", changed)
    shutil.copy(changed / "shard-000001.tar", changed / "shard-000004.tar")
    with ShardServer(changed.parent) as server:
        result = distill_from(f"{server.url}/shards", run_inputs, tmp_path / "stopped")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert any("shard-000004.tar does not match index.json" in line for line in errors), errors


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def shard_digests(folder) -> list:
    return [s["sha256"] for s in read_index(folder).shards]


def test_the_loader_rate_script_measures_the_folder_and_the_served_folder(shards, tiny_student, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "rate.json"
    cmd = [sys.executable, "-m", "disco_dist.bench.loader_rate", "--shards", str(shards), "--serve", "--ranks", "2"]
    cmd += ["--student", str(tiny_student), "--batch-size", "8", "--consumption", "10", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["source"].startswith("http://127.0.0.1:") for r in rows] == [False, True]
    assert all(r["sentences"] == 2 * (150 // 8) * 8 for r in rows)  # 2 ranks, 150 sentences each, batch 8
    assert all(r["x_consumption"] == round(r["sentences_per_s"] / 10, 1) for r in rows)
    # both are rounded to 0.1 from the same unrounded rate, so they agree to within one rounding step
    assert all(abs(r["sentences_per_s_per_core"] - r["sentences_per_s"] / 2) <= 0.1 for r in rows)
    assert all(0 < r["tokenize_share"] < 1 and r["tokenize_sentences_per_s_per_core"] > 0 for r in rows)
    assert "sentences/s" in result.stdout and "CPU:" in result.stdout


def test_a_cut_chunked_response_a_signed_url_and_a_silent_command(shards, monkeypatch, tmp_path):
    local = [(k, t) for k, t, _ in iter_shard_samples(read_index(shards), with_keys=True)]
    with ShardServer(shards.parent, cut={"shard-000003.tar": 1}, chunked=True) as server:
        signed = read_index(f"{server.url}/shards/{{name}}?sig=abc%3D")  # {name} before the query
        assert [(k, t) for k, t, _ in iter_shard_samples(signed, with_keys=True)] == local
        assert server.gets["shard-000003.tar"] == 2  # the cut chunked response was read again
    monkeypatch.setenv("DISCO_SHARD_TIMEOUT", "0.5")
    monkeypatch.setenv("DISCO_SHARD_RETRIES", "0")
    script = tmp_path / "hangs_on_shards.py"  # prints index.json, then hangs on every shard
    script.write_text(
        "import sys, time\n"
        "if 'shard' in sys.argv[1]: time.sleep(30)\n"
        f"sys.stdout.buffer.write(open('{shards}/' + sys.argv[1], 'rb').read())\n"
    )
    silent = f"pipe:{sys.executable} {script} {{name}}"
    index = read_index(silent)
    with pytest.raises(RankError, match=r"printed nothing for 0.5 s \(DISCO_SHARD_TIMEOUT\)"):
        list(iter_shard_samples(index, numbers=[0]))
    with pytest.raises(UserError, match="cannot be split into words"):
        read_index("pipe:cat 'unclosed {name}")


def test_a_bad_shard_met_by_a_worker_is_the_same_one_line(changed):
    with ShardServer(changed.parent) as server:
        index = read_index(f"{server.url}/shards")
        loader = ShardBatches(index, 8, 0, 1, texts_only, seed=3, shuffle_buffer=40, num_workers=1)
        with pytest.raises(RankError) as caught:
            list(loader.batches(0))
    assert "shard-000004.tar does not match index.json" in str(caught.value) and "\n" not in str(caught.value)
