"""The seven-task STS evaluation as SimCSE and DisCo report it.

Cosine similarity of the two sentence embeddings against the gold score, Spearman x 100; STS12-16 pool all
scored pairs of a year's sub-sets ("all"); STS-B and SICK-R on their test splits; the average is the plain
mean of the seven.
"""

import hashlib
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from ..core.errors import UserError
from ..data.sts import read_sts_task

# display name -> (reader task, split)
TASKS = {
    "STS12": ("STS12", "test"),
    "STS13": ("STS13", "test"),
    "STS14": ("STS14", "test"),
    "STS15": ("STS15", "test"),
    "STS16": ("STS16", "test"),
    "STS-B": ("STSBenchmark", "test"),
    "SICK-R": ("SICKRelatedness", "test"),
}


def _unique(pairs) -> list:
    return list(dict.fromkeys(pairs.sentences1 + pairs.sentences2))


def _spearman(a: torch.Tensor, b: torch.Tensor, gold) -> float:
    return float(spearmanr(F.cosine_similarity(a, b, dim=-1).numpy(), gold).statistic) * 100


def _sides(embeddings: torch.Tensor, pairs, unique: list) -> tuple:
    """(first sentences' rows, second sentences' rows) of `embeddings`, one row per sentence of `unique`."""
    position = {s: i for i, s in enumerate(unique)}
    return (embeddings[[position[s] for s in pairs.sentences1]], embeddings[[position[s] for s in pairs.sentences2]])


def spearman_x100(encoder, pairs, batch_size=64, progress=False) -> float:
    # each distinct sentence is encoded once, however many pairs it appears in
    unique = _unique(pairs)
    embeddings = encoder.encode(unique, batch_size=batch_size, progress=progress)
    return _spearman(*_sides(embeddings, pairs, unique), pairs.scores)


def evaluate_sts(encoder, data_root=None, tasks=tuple(TASKS), batch_size=64, progress=False) -> dict:
    """{task: Spearman x 100, ..., "avg": mean of the tasks} for the encoder (in eval mode, no gradients)."""
    return score_sts(encoder, data_root, tasks, batch_size, progress)["scores"]


def _with_avg(scores: dict) -> dict:
    return {**scores, "avg": sum(scores.values()) / len(scores)}


def score_sts(encoder, data_root=None, tasks=tuple(TASKS), batch_size=64, progress=False, dims=(), teacher=None):
    """The seven-task scores, from one pass of the encoder over each task's sentences:
    scores          {task: Spearman x 100, "avg": the mean}
    scores_by_dim   {width: scores of the embeddings' first `width` dimensions} for each of `dims`
    asymmetric      (with `teacher`, a `TeacherSide`) one sentence of each pair embedded by the encoder, the
                    other by the teacher, both ways round; the task score is the mean of the two Spearmans
    teacher_scores  the teacher's own scores (both sides by the teacher), a check on its cached embeddings
    speed           sentences per second of the encoder (and of the teacher) over these sentences
    """
    bad = [d for d in dims if not 0 < d <= encoder.dim]
    if bad:
        raise UserError(f"--dims {' '.join(map(str, bad))}: the model's embeddings have {encoder.dim} dimensions")
    if dims and encoder.dense is not None:
        raise UserError(
            "--dims on a model with a Dense head would cut the head's output, which no width was trained for; "
            "add --no-head to score widths of the encoder's own output"
        )
    out = {"scores": {}, "scores_by_dim": {d: {} for d in dims}}
    if teacher is not None:
        out.update(asymmetric={}, teacher_scores={})
    seconds = sentences = 0
    for name in tasks:
        task, split = TASKS[name]
        pairs = read_sts_task(task, data_root, split)
        unique = _unique(pairs)
        start = time.perf_counter()
        embeddings = encoder.encode(unique, batch_size=batch_size, progress=progress)
        seconds, sentences = seconds + time.perf_counter() - start, sentences + len(unique)
        a, b = _sides(embeddings, pairs, unique)
        out["scores"][name] = _spearman(a, b, pairs.scores)
        for d in dims:
            out["scores_by_dim"][d][name] = _spearman(a[:, :d], b[:, :d], pairs.scores)
        if teacher is not None:
            if embeddings.shape[1] != teacher.dim:
                raise UserError(
                    f"--against-teacher: the model returns {embeddings.shape[1]} dimensions, the teacher "
                    f"{teacher.dim}; a student scored against its teacher needs its head (distill.py --keep-head)"
                )
            ta, tb = _sides(teacher.embeddings(name, unique), pairs, unique)
            out["asymmetric"][name] = (_spearman(a, tb, pairs.scores) + _spearman(ta, b, pairs.scores)) / 2
            out["teacher_scores"][name] = _spearman(ta, tb, pairs.scores)
    out["speed"] = {"sentences_per_s": round(sentences / seconds, 2), "sentences": sentences}
    if teacher is not None:
        out["speed"].update(teacher.speed())
    for key in ("scores", "asymmetric", "teacher_scores"):
        if key in out:
            out[key] = _with_avg(out[key])
    out["scores_by_dim"] = {d: _with_avg(scores) for d, scores in out["scores_by_dim"].items()}
    return out


class TeacherSide:
    """The teacher's embeddings of each task's sentences for asymmetric scoring, computed once and kept in
    `cache` (a torch file, if given) with the time they took, so repeated evaluations against one teacher
    embed nothing with it again. A cache made from other sentences or another teacher is recomputed."""

    def __init__(self, name: str, cache: Path | None, batch_size: int, progress=False, device=None):
        self.name, self.cache, self.batch_size, self.progress, self.device = name, cache, batch_size, progress, device
        self.saved = torch.load(cache, weights_only=True) if cache and Path(cache).is_file() else {}
        if self.saved.get("teacher") != name:
            self.saved = {"teacher": name, "tasks": {}}
        self._encoder = None

    @property
    def dim(self) -> int:
        kept = next(iter(self.saved["tasks"].values()), None)
        return kept["embeddings"].shape[1] if kept else self._load().dim

    def _load(self):
        if self._encoder is None:
            from ..models.encoder import Encoder

            self._encoder = Encoder.from_pretrained(self.name).to(self.device or "cpu")
        return self._encoder

    def embeddings(self, task: str, sentences: list) -> torch.Tensor:
        digest = hashlib.sha256("\n".join(sentences).encode()).hexdigest()
        kept = self.saved["tasks"].get(task)
        if kept is None or kept["sha256"] != digest:
            start = time.perf_counter()
            embeddings = self._load().encode(sentences, batch_size=self.batch_size, progress=self.progress)
            from ..core.hardware import hardware

            seconds = time.perf_counter() - start
            kept = {"sha256": digest, "embeddings": embeddings, "seconds": seconds, "hardware": hardware()}
            self.saved["tasks"][task] = kept
            if self.cache:
                Path(self.cache).parent.mkdir(parents=True, exist_ok=True)
                torch.save(self.saved, f"{self.cache}.partial")
                os.replace(f"{self.cache}.partial", self.cache)
        return kept["embeddings"]

    def speed(self) -> dict:
        tasks = self.saved["tasks"].values()
        rate = sum(len(t["embeddings"]) for t in tasks) / sum(t["seconds"] for t in tasks)
        machines = sorted({t.get("hardware", "unrecorded") for t in tasks})
        return {"teacher": self.name, "teacher_sentences_per_s": round(rate, 2), "teacher_hardware": machines}


def stsb_dev_spearman(encoder, data_root=None, batch_size=64) -> float:
    """STS-B dev Spearman x 100: the only score used for model selection (test sets never choose anything)."""
    return spearman_x100(encoder, read_sts_task("STSBenchmark", data_root, "dev"), batch_size)


def format_table(rows: dict) -> str:
    """rows: {label: scores}; one line per label, the seven tasks and the average, two decimals."""
    columns = list(TASKS) + ["avg"]
    width = max([len("model")] + [len(label) for label in rows])
    lines = [f"{'model':<{width}}  " + "  ".join(f"{c:>6}" for c in columns)]
    for label, scores in rows.items():
        lines.append(
            f"{label:<{width}}  " + "  ".join(f"{scores[c]:6.2f}" if c in scores else f"{'-':>6}" for c in columns)
        )
    return "\n".join(lines)


def evaluation_record(model: str, encoder, scores: dict, seconds: float) -> dict:
    return {
        "model": model,
        "scores": scores,
        "protocol": "cosine, Spearman x100; STS12-16 all pairs pooled per year; STS-B and SICK-R test; plain mean",
        "pooling": encoder.pooling,
        "normalize": encoder.normalize,
        "max_length": encoder.max_length,
        "layers": encoder.model.config.num_hidden_layers,
        "device": str(next(encoder.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        "seconds": round(seconds, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
