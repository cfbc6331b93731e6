"""The seven-task STS evaluation as SimCSE and DisCo report it.

Cosine similarity of the two sentence embeddings against the gold score, Spearman x 100; STS12-16 pool all
scored pairs of a year's sub-sets ("all"); STS-B and SICK-R on their test splits; the average is the plain
mean of the seven.
"""

import time

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from .data import read_sts_task

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


def spearman_x100(encoder, pairs, batch_size=64, progress=False) -> float:
    # each distinct sentence is encoded once, however many pairs it appears in
    unique = list(dict.fromkeys(pairs.sentences1 + pairs.sentences2))
    position = {s: i for i, s in enumerate(unique)}
    embeddings = encoder.encode(unique, batch_size=batch_size, progress=progress)
    a = embeddings[[position[s] for s in pairs.sentences1]]
    b = embeddings[[position[s] for s in pairs.sentences2]]
    cosine = F.cosine_similarity(a, b, dim=-1)
    return float(spearmanr(cosine.numpy(), pairs.scores).statistic) * 100


def evaluate_sts(encoder, data_root=None, tasks=tuple(TASKS), batch_size=64, progress=False) -> dict:
    """{task: Spearman x 100, ..., "avg": mean of the tasks} for the encoder (in eval mode, no gradients)."""
    scores = {}
    for name in tasks:
        task, split = TASKS[name]
        scores[name] = spearman_x100(encoder, read_sts_task(task, data_root, split), batch_size, progress)
    scores["avg"] = sum(scores[t] for t in tasks) / len(tasks)
    return scores


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
