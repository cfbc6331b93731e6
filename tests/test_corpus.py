"""Corpora in: text, JSONL, Parquet and a datasets folder give the same shards; filters, bad rows, corrupt files
and the bounded-memory shuffle and deduplication."""

import gzip
import json

import pytest
from conftest import assert_one_line, run

from disco_dist.core.errors import UserError
from disco_dist.data.corpus import CorpusStats, read_corpus
from disco_dist.data.dedupe import SeenHashes
from disco_dist.data.make_shards import make_shards
from disco_dist.data.shards import iter_shard_samples

ROWS = [f"sentence {i} " + "word " * (i % 7) for i in range(150)] + ["", "sentence 3 word word word ", "   "]


def quiet(*_):
    pass


def shard_digests(index):
    return [(s["samples"], s["sha256"]) for s in index.shards]


@pytest.fixture
def text_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(ROWS) + "\n")
    return path


def test_jsonl_parquet_and_a_datasets_folder_give_the_same_shards_as_the_text_file(text_corpus, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"id": i, "body": text} for i, text in enumerate(ROWS)]
    jsonl = tmp_path / "corpus.jsonl.gz"
    with gzip.open(jsonl, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    parquet = tmp_path / "parquet"  # a folder of two files, read in name order
    parquet.mkdir()
    pq.write_table(pa.Table.from_pylist(records[:70]), parquet / "part-0.parquet", row_group_size=16)
    pq.write_table(pa.Table.from_pylist(records[70:]), parquet / "part-1.parquet")
    (parquet / "README.md").write_text("not a corpus file")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(records).save_to_disk(str(saved))

    options = dict(shard_size=40, seed=5, min_chars=0)
    expected = make_shards(text_corpus, tmp_path / "from-text", log=quiet, **options)
    said = []
    for source in (jsonl, parquet, saved):
        index = make_shards(source, tmp_path / f"from-{source.name}", text_field="body", log=said.append, **options)
        assert shard_digests(index) == shard_digests(expected), source  # byte-identical shard files
        assert index.meta["dropped"] == expected.meta["dropped"] and index.meta["rows_read"] == 153
    assert expected.meta["dropped"]["duplicate"] == 1 and expected.meta["dropped"]["empty"] == 2
    assert any("1 file(s) of" in line and "README.md" in line for line in said)


def test_length_filters_are_counted_and_never_truncate(text_corpus):
    stats = CorpusStats()
    kept = list(read_corpus(text_corpus, stats, min_chars=13, max_chars=30))
    assert kept and all(13 <= len(s) <= 30 for s in kept)
    assert stats.too_short == sum(1 for r in ROWS if 0 < len(r.strip()) < 13)
    assert stats.too_long == sum(1 for r in ROWS if len(r.strip()) > 30)
    assert stats.rows == len(ROWS) == stats.kept + sum(stats.dropped().values())


def test_a_row_that_is_not_text_stops_with_its_file_and_row_or_is_counted(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = ['{"text": "one"}', '{"text": null}', '{"text": 7}', "{not json", '["a list"]', '{"body": "x"}', ""]
    path.write_text("\n".join(lines + ['{"text": "two"}']) + "\n")
    with pytest.raises(UserError, match=rf"{path}: row 2: field 'text' is null, not text; .*--bad-rows skip"):
        list(read_corpus(path))
    stats, said = CorpusStats(), []
    assert list(read_corpus(path, stats, bad_rows="skip", log=said.append)) == ["one", "two"]
    assert (stats.bad, stats.empty, stats.rows) == (5, 1, 8) and len(said) == 1 and "row 2" in said[0]
    with pytest.raises(UserError, match=r"row 1: no field 'body' \(the row has: text\); pass --text-field NAME"):
        list(read_corpus(path, text_field="body"))


def test_corrupt_and_mismatched_files_are_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    truncated = tmp_path / "cut.txt.gz"
    whole = gzip.compress("".join(f"sentence {i}\n" for i in range(20000)).encode())
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=r"cut.txt.gz: unreadable after row \d+ .*corrupt or truncated"):
        list(read_corpus(truncated))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match="broken.parquet: not a readable Parquet file"):
        list(read_corpus(broken))
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2], "title": ["a", "b"]}), numbers)
    with pytest.raises(UserError, match=r"numbers.parquet: column 'text' holds int64, not text"):
        list(read_corpus(numbers))
    with pytest.raises(UserError, match=r"no column 'body' \(columns: text, title\)"):
        list(read_corpus(numbers, text_field="body"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no corpus file"):
        list(read_corpus(empty))


def test_a_missing_corpus_names_the_path_not_the_data_root(tmp_path):
    result = run("make_shards.py", "--corpus", tmp_path / "nonexistent.txt", "--out", tmp_path / "s")
    assert_one_line(result, f"corpus {tmp_path / 'nonexistent.txt'} does not exist", "JSONL")
    assert "--data-root" not in result.stderr and not (tmp_path / "s").exists()


def test_a_corpus_larger_than_memory_is_shuffled_through_buckets(text_corpus, tmp_path):
    in_memory = make_shards(text_corpus, tmp_path / "a", shard_size=25, seed=1, log=quiet)
    bucketed = make_shards(text_corpus, tmp_path / "b", shard_size=25, seed=1, shuffle_rows=40, log=quiet)
    again = make_shards(text_corpus, tmp_path / "c", shard_size=25, seed=1, shuffle_rows=40, log=quiet)
    texts = [t for t, _ in iter_shard_samples(bucketed)]
    assert sorted(texts) == sorted(t for t, _ in iter_shard_samples(in_memory)) and len(texts) == 150
    assert shard_digests(bucketed) == shard_digests(again)  # deterministic for a seed
    assert texts != [t for t, _ in iter_shard_samples(in_memory)]
    assert not any(p.name.startswith(".") for p in (tmp_path / "b").iterdir())  # temporary buckets removed
    # both halves of the corpus are spread over the output: no bucket is a run of consecutive input rows
    first_half = [int(t.split()[1]) < 75 for t in texts]
    assert 0.3 < sum(first_half[:75]) / 75 < 0.7


def test_the_seen_set_keeps_first_occurrences_in_eight_bytes_a_sentence():
    seen = SeenHashes()
    texts = [f"s{i % 1000}" for i in range(3000)]
    firsts = [seen.first_seen(texts[i : i + 128]) for i in range(0, 3000, 128)]
    kept = [
        t for chunk, mask in zip(range(0, 3000, 128), firsts) for t, m in zip(texts[chunk : chunk + 128], mask) if m
    ]
    assert kept == [f"s{i}" for i in range(1000)]
    assert len(seen) == 1000 and seen.nbytes == 8000
    assert all(len(a) >= 2 * len(b) for a, b in zip(seen.runs, seen.runs[1:]))


def test_folders_under_hidden_or_parent_paths_gz_parts_and_formats_not_read(tmp_path):
    folder = tmp_path / ".cache" / "corpus"  # a dataset under ~/.cache or reached through ../ is still read
    folder.mkdir(parents=True)
    (folder / "part-0.gz").write_bytes(gzip.compress(b"alpha\nbeta\n"))
    (folder / "part-1.json").write_text('{"text": "gamma"}\n')
    (folder / ".hidden.txt").write_text("not read\n")
    assert list(read_corpus(folder / ".." / "corpus")) == ["alpha", "beta", "gamma"]
    table = tmp_path / "table.csv"
    table.write_text("text\nalpha\n")
    with pytest.raises(UserError, match=r"table.csv: this format is not read; convert it"):
        list(read_corpus(table))


def test_undecodable_jsonl_rows_are_counted_and_a_bad_row_past_the_limit_is_never_read(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": "\\ud800 lone"}\n{"text": "\xff\xfe"}\n{"text": "two"}\n{"text": 5}\n')
    stats = CorpusStats()
    assert list(read_corpus(path, stats, limit=2)) == ["one", "two"]  # row 5 (not text) is past the limit
    assert (stats.undecodable, stats.bad, stats.rows) == (2, 0, 4)
    out = tmp_path / "shards"
    with pytest.raises(UserError, match="row 5: field 'text' is int"):
        make_shards(path, out, log=quiet)
    assert not out.exists()  # a corpus that fails leaves no folder behind
