import gzip

import pytest

from disco_dist.core.errors import UserError
from disco_dist.data.corpus import CorpusStats, read_corpus
from disco_dist.data.nli import read_nli_triplets
from disco_dist.data.paths import resolve_data_root
from disco_dist.data.sts import read_sick, read_sts_benchmark, read_sts_year


@pytest.mark.parametrize(
    "year,count", [("STS12", 3108), ("STS13", 1500), ("STS14", 3750), ("STS15", 3000), ("STS16", 1186)]
)
def test_sts_years_pool_all_scored_pairs(data_root, year, count):
    pairs = read_sts_year(year, data_root)
    assert len(pairs) == len(pairs.sentences1) == len(pairs.sentences2) == count
    assert all(0.0 <= s <= 5.0 for s in pairs.scores)


def test_sts_benchmark_and_sick_counts(data_root):
    assert [len(read_sts_benchmark(s, data_root)) for s in ("train", "dev", "test")] == [5749, 1500, 1379]
    sick = read_sick("test", data_root)
    assert len(sick) == 4927
    # CRLF line ends must not leak into the text or the score
    assert not any(s.endswith("\r") for s in sick.sentences1 + sick.sentences2)
    assert [len(read_sick(s, data_root)) for s in ("train", "trial")] == [4500, 500]


def test_nli_triplets(data_root):
    anchors, positives, negatives = read_nli_triplets(data_root=data_root)
    assert len(anchors) == len(positives) == len(negatives) == 3172 + 3167
    assert anchors[0] == "Two women are embracing while holding to go packages."


def test_data_root_precedence(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("DISCO_DATA_ROOT", str(tmp_path))
    assert resolve_data_root() == tmp_path
    assert resolve_data_root(data_root) == data_root  # the flag wins over the environment
    monkeypatch.setenv("DISCO_DATA_ROOT", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="DISCO_DATA_ROOT"):
        resolve_data_root()


def test_missing_file_names_path_and_fix(tmp_path):
    with pytest.raises(UserError) as err:
        read_sts_benchmark("test", tmp_path)
    assert str(tmp_path / "sts" / "STSBenchmark" / "sts-test.csv") in str(err.value)
    assert "--data-root" in str(err.value)


def test_malformed_sts_line(tmp_path):
    folder = tmp_path / "sts" / "STS12-en-test"
    folder.mkdir(parents=True)
    for sub in ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"):
        (folder / f"STS.input.{sub}.txt").write_text("a cat\ta dog\nonly one column\n")
        (folder / f"STS.gs.{sub}.txt").write_text("3.0\n2.0\n")
    with pytest.raises(UserError, match=r"STS.input.MSRpar.txt:2: expected 2 tab-separated"):
        read_sts_year("STS12", tmp_path)


def test_unscored_pairs_are_skipped(tmp_path):
    folder = tmp_path / "sts" / "STS13-en-test"
    folder.mkdir(parents=True)
    for sub in ("FNWN", "headlines", "OnWN"):
        (folder / f"STS.input.{sub}.txt").write_text("a\tb\nc\td\ne\tf\n")
        (folder / f"STS.gs.{sub}.txt").write_text("1.0\n\n4.5\n")
    pairs = read_sts_year("STS13", tmp_path)
    assert pairs.sentences1 == ["a", "e"] * 3 and pairs.scores == [1.0, 4.5] * 3


def test_nli_without_columns_is_clear(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("premise,hypothesis\na,b\n")
    with pytest.raises(UserError, match="missing column.*sent0"):
        read_nli_triplets([bad])
    empty_cell = tmp_path / "empty.csv"
    empty_cell.write_text("sent0,sent1,hard_neg\na,b,c\nd,,f\n")
    with pytest.raises(UserError, match="row 2 has an empty cell"):
        read_nli_triplets([empty_cell])


def test_corpus_drops_and_counts(tmp_path):
    path = tmp_path / "c.txt.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"first\n\n   \nsecond\nfirst\n\xff\xfe bad\n" + b"x" * 100_000 + b"\n")
    stats = CorpusStats()
    sentences = list(read_corpus(path, stats))
    assert sentences == ["first", "second", "x" * 100_000]  # long lines kept whole
    assert (stats.empty, stats.duplicates, stats.undecodable, stats.kept) == (2, 1, 1, 3)
