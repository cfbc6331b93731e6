"""STS12-16 (SentEval layout), STS Benchmark and SICK-R readers.

Each returns `StsPairs`: two sentence lists and the gold scores, in file order. Files are tab-separated
text with quote characters that are part of the sentences, so they are split on tabs, never CSV-parsed.
"""

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError
from .paths import require_file, resolve_data_root

# The sub-sets SentEval (and so SimCSE and DisCo) score for each year; STS13's SMT is not distributed.
STS_YEAR_SUBSETS = {
    "STS12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "STS13": ("FNWN", "headlines", "OnWN"),
    "STS14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "STS15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "STS16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}
STS_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness")


@dataclass
class StsPairs:
    sentences1: list
    sentences2: list
    scores: list

    def __len__(self):
        return len(self.scores)

    def extend(self, other: "StsPairs") -> None:
        self.sentences1 += other.sentences1
        self.sentences2 += other.sentences2
        self.scores += other.scores


def _read_lines(path: Path) -> list:
    # newline="" keeps "\r" visible so CRLF files are handled the same as LF ones, by rstrip below
    with open(require_file(path), encoding="utf-8", newline="") as f:
        return [line.rstrip("\r") for line in f.read().split("\n")]


def _split(line: str, path: Path, lineno: int, min_fields: int) -> list:
    fields = line.split("\t")
    if len(fields) < min_fields:
        raise UserError(f"{path}:{lineno}: expected at least {min_fields} tab-separated columns, found {len(fields)}")
    return fields


def _score(text: str, path: Path, lineno: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{path}:{lineno}: score {text!r} is not a number") from None


def _nonempty_lines(path: Path) -> list:
    lines = _read_lines(path)
    while lines and lines[-1] == "":  # trailing newline(s) at the end of the file
        lines.pop()
    return lines


def read_sts_subset(folder: Path, subset: str) -> StsPairs:
    """One SentEval sub-set: pairs whose gold line is empty are unscored and skipped."""
    input_path = folder / f"STS.input.{subset}.txt"
    gold_path = folder / f"STS.gs.{subset}.txt"
    inputs, golds = _nonempty_lines(input_path), _nonempty_lines(gold_path)
    if len(golds) > len(inputs):
        raise UserError(f"{gold_path} has {len(golds)} lines but {input_path} only {len(inputs)}")
    pairs = StsPairs([], [], [])
    for lineno, (line, gold) in enumerate(zip(inputs, golds), 1):
        if not gold.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise UserError(f"{input_path}:{lineno}: expected 2 tab-separated sentences, found {len(fields)} columns")
        pairs.sentences1.append(fields[0])
        pairs.sentences2.append(fields[1])
        pairs.scores.append(_score(gold.strip(), gold_path, lineno))
    return pairs


def read_sts_year(year: str, data_root=None) -> StsPairs:
    """STS12..STS16, all scored pairs of the year's sub-sets pooled (the "all" setting)."""
    if year not in STS_YEAR_SUBSETS:
        raise UserError(f"unknown STS year {year!r}; known: {', '.join(STS_YEAR_SUBSETS)}")
    folder = resolve_data_root(data_root) / "sts" / f"{year}-en-test"
    pooled = StsPairs([], [], [])
    for subset in STS_YEAR_SUBSETS[year]:
        pooled.extend(read_sts_subset(folder, subset))
    return pooled


def read_sts_benchmark(split: str = "test", data_root=None) -> StsPairs:
    """STS-B train/dev/test: score in column 5, sentences in 6 and 7 (extra source columns ignored)."""
    if split not in ("train", "dev", "test"):
        raise UserError(f"unknown STS-B split {split!r}; use train, dev or test")
    path = resolve_data_root(data_root) / "sts" / "STSBenchmark" / f"sts-{split}.csv"
    pairs = StsPairs([], [], [])
    for lineno, line in enumerate(_nonempty_lines(path), 1):
        fields = _split(line, path, lineno, 7)
        pairs.sentences1.append(fields[5])
        pairs.sentences2.append(fields[6])
        pairs.scores.append(_score(fields[4], path, lineno))
    return pairs


SICK_FILES = {"train": "SICK_train.txt", "trial": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}


def read_sick(split: str = "test", data_root=None) -> StsPairs:
    """SICK relatedness (SICK-R): header line, then pair_ID, sentence_A, sentence_B, relatedness_score, ..."""
    if split not in SICK_FILES:
        raise UserError(f"unknown SICK split {split!r}; use train, trial or test")
    path = resolve_data_root(data_root) / "sick" / SICK_FILES[split]
    lines = _nonempty_lines(path)
    header = lines[0].split("\t") if lines else []
    if header[:4] != ["pair_ID", "sentence_A", "sentence_B", "relatedness_score"]:
        raise UserError(f"{path}:1: expected header 'pair_ID sentence_A sentence_B relatedness_score ...'")
    pairs = StsPairs([], [], [])
    for lineno, line in enumerate(lines[1:], 2):
        fields = _split(line, path, lineno, 4)
        pairs.sentences1.append(fields[1])
        pairs.sentences2.append(fields[2])
        pairs.scores.append(_score(fields[3], path, lineno))
    return pairs


def read_sts_task(task: str, data_root=None, split: str = "test") -> StsPairs:
    """One of the seven evaluation tasks by its SentEval name (STS12..STS16, STSBenchmark, SICKRelatedness)."""
    if task in STS_YEAR_SUBSETS:
        return read_sts_year(task, data_root)
    if task == "STSBenchmark":
        return read_sts_benchmark(split, data_root)
    if task == "SICKRelatedness":
        return read_sick(split, data_root)
    raise UserError(f"unknown task {task!r}; known: {', '.join(STS_TASKS)}")
