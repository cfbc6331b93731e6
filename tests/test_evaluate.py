import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from scipy.stats import spearmanr

from disco_dist.data.sts import read_sts_task
from disco_dist.evaluation.evaluate import TASKS, evaluate_sts
from disco_dist.models.encoder import Encoder


def direct_spearman(model_dir, pairs):
    """The protocol computed independently: transformers + mean pooling + cosine + scipy.

    Each distinct sentence gets one embedding (as in the evaluator), so identical pairs score exactly 1
    on both sides instead of 1 +- rounding, which would reorder ties of this near-degenerate random model."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    unique = sorted(set(pairs.sentences1 + pairs.sentences2))
    embeddings = {}
    with torch.no_grad():
        for i in range(0, len(unique), 256):
            chunk = unique[i : i + 256]
            batch = tokenizer(chunk, padding=True, truncation=True, max_length=64, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            embeddings.update(zip(chunk, (hidden * mask).sum(1) / mask.sum(1)))
    sims = [
        torch.nn.functional.cosine_similarity(embeddings[a], embeddings[b], dim=0).item()
        for a, b in zip(pairs.sentences1, pairs.sentences2)
    ]
    return spearmanr(sims, pairs.scores).statistic * 100


def test_evaluator_matches_direct_scipy_computation(tiny_student, data_root):
    encoder = Encoder.from_pretrained(tiny_student)
    tasks = ("STS13", "STS-B", "SICK-R")
    scores = evaluate_sts(encoder, data_root, tasks, batch_size=128)
    for name in tasks:
        task, split = TASKS[name]
        assert scores[name] == pytest.approx(
            direct_spearman(tiny_student, read_sts_task(task, data_root, split)), abs=1e-3
        )
    assert scores["avg"] == pytest.approx(sum(scores[t] for t in tasks) / 3)


def test_evaluate_launcher_prints_table_and_writes_json(tiny_student, tmp_path):
    out = tmp_path / "eval.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "launchers" / "evaluate.py"),
            str(tiny_student),
            "--keep-layers",
            "0",
            "1",
            "--out",
            str(out),
            "--label",
            "tiny",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "STS12" in result.stdout and "SICK-R" in result.stdout and "tiny" in result.stdout
    record = json.loads(out.read_text())
    assert set(record["scores"]) == set(TASKS) | {"avg"}
    assert record["layers"] == 2 and record["pooling"] == "mean"
    assert record["scores"]["avg"] == pytest.approx(sum(record["scores"][t] for t in TASKS) / 7)


def test_evaluate_launcher_bad_model_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "launchers" / "evaluate.py"), str(tmp_path / "no" / "model")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
