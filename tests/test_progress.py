"""Progress a person can read in a log file: the cache pass and shard making print count, rate and ETA lines when
stderr is not a terminal (a SLURM or CI log); DISCO_PROGRESS_SECONDS sets how often."""

import re

from conftest import assert_one_line, build_tiny_model, run

from disco_dist.core.progress import Progress, duration

LINE = r"{what}: [\d,]+/{total} sentences \(\d+%\), [\d,.]+ sentences/s, ETA \d+m\d\ds"


def test_a_line_holds_count_share_rate_and_eta(monkeypatch):
    monkeypatch.setenv("DISCO_PROGRESS_SECONDS", "0")
    lines = []
    progress = Progress("cache pass", "sentences", total=1000, log=lines.append)
    progress.update(250)
    progress.update(250)
    assert len(lines) == 2 and lines[0].startswith("cache pass: 250/1,000 sentences (25%), ")
    assert re.fullmatch(LINE.format(what="cache pass", total="1,000"), lines[1]), lines[1]
    assert duration(3725) == "1h02m" and duration(249) == "4m09s"


def test_lines_wait_for_the_interval_and_unknown_totals_have_no_eta(monkeypatch):
    monkeypatch.setenv("DISCO_PROGRESS_SECONDS", "3600")
    lines = []
    progress = Progress("reading", "lines", log=lines.append)
    progress.update(10)
    assert lines == []
    assert re.fullmatch(r"reading: 10 lines, [\d,.]+ lines/s", progress.line())


def test_the_cache_pass_and_shard_making_print_progress_lines_in_a_log(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the {i} dog plays in a park" for i in range(40)) + "\n")
    env = {"DISCO_PROGRESS_SECONDS": "0"}
    made = run("make_shards.py", "--corpus", corpus, "--out", tmp_path / "shards", "--shard-size", "10", env=env)
    assert made.returncode == 0, made.stderr[-2000:]
    assert re.search(LINE.format(what="make_shards: writing", total="40"), made.stdout), made.stdout
    teacher = build_tiny_model(tmp_path / "teacher", hidden=32, layers=2)
    cached = run(
        "cache_teacher.py", "--shards", tmp_path / "shards", "--out", tmp_path / "cached", "--teacher", teacher, env=env
    )
    assert cached.returncode == 0, cached.stderr[-2000:]
    lines = [line for line in cached.stdout.splitlines() if line.startswith("cache pass")]
    assert len(lines) >= 2 and re.fullmatch(LINE.format(what=r"cache pass \(rank 0\)", total="40"), lines[-1]), lines
    assert lines[-1].startswith("cache pass (rank 0): 40/40 sentences (100%)")


def test_a_bad_interval_is_one_clear_error(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a dog\n")
    result = run("make_shards.py", "--corpus", corpus, "--out", tmp_path / "s", env={"DISCO_PROGRESS_SECONDS": "soon"})
    assert_one_line(result, "DISCO_PROGRESS_SECONDS='soon'", "0 or more")
