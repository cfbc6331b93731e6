"""The benchmark script at a tiny size, so that it keeps working (no timing assertions), and the FLOP count
it divides by."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, build_tiny_run_inputs


def test_flops_per_sentence_counts_projections_feed_forward_and_attention():
    from types import SimpleNamespace

    from disco_dist.bench.benchmark import training_flops_per_sentence

    config = SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=2)
    # per layer, a 3-token sentence: 2*(4*16 + 2*4*8)*3 = 768 (projections, FFN) + 4*9*4 = 144 (attention)
    assert training_flops_per_sentence(config, [3], None) == 3 * 2 * (768 + 144)
    assert training_flops_per_sentence(config, [3, 3], 5) == 3 * (2 * (768 + 144) + 2 * 4 * 5)


@pytest.mark.slow
def test_benchmark_runs_every_part_at_a_tiny_size(tmp_path):
    sentences = [f"the {i} dog plays in the park with {i % 7} children today" for i in range(128)]
    root, student, teacher, corpus = build_tiny_run_inputs(tmp_path, sentences, shard_size=16)
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(REPO / "launchers" / "benchmark.py"),
        "--student",
        student,
        "--teacher",
        teacher,
        "--corpus",
        corpus,
        "--teacher-sentences",
        128,
        "--batch-size",
        8,
        "--warmup-steps",
        2,
        "--steps",
        4,
        "--ckd-steps",
        4,
        "--queue-size",
        64,
        "--repeats",
        1,
        "--st-batch-sizes",
        8,
        32,
        "--ceiling-batch-sizes",
        16,
        "--teacher-ds-config",
        REPO / "ds_configs" / "teacher_zero3_prefetch.json",
        "--teacher-token-budget",
        300,
        "--work-dir",
        tmp_path / "work",
        "--out",
        out,
    ]
    # the machine's default precision set to bf16: every part must still run at the benchmark's own (fp32)
    env = {**os.environ, "DISCO_PRECISION": "bf16"}
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == [
        "teacher_encode",
        "zero3_vs_replicated",
        "st_training",
        "mfu",
        "loader_headroom",
        "ckd_overhead",
    ]
    assert rows[0]["detail"]["disco_token_budget"] == 300, rows[0]  # the cache pass ran with the budget asked for
    zero3 = rows[1]  # both sides at the benchmark's precision (fp32), the ZeRO-3 side under the config asked for
    assert zero3["detail"]["zero3_config"] == "teacher_zero3_prefetch.json", zero3
    assert zero3["detail"]["dtypes"] == ["replicated float32", "zero3 float32"], zero3
    mfu, training = rows[3]["detail"], rows[2]["detail"]  # the value: the 2-rank run's, over the higher peak
    assert mfu["ranks"] == 2 and mfu["precision"] == "fp32" and len(mfu["ranks_sentences_per_s"]) == 1, mfu
    two_ranks = mfu["ranks_sentences_per_s"][0] / max(mfu["ranks_matmul_tflops"], mfu["matmul_tflops"])
    one_process = training["disco_sentences_per_s"] / mfu["matmul_tflops"]
    expected = mfu["one_process_mfu"] * two_ranks / one_process  # tiny models: MFU ~0.002, the row rounds to 4 places
    assert rows[3]["value"] == pytest.approx(expected, rel=1e-2, abs=1e-4), mfu
    # the plain loop measured in the same run: training at the row's batch and the larger one asked for
    assert sorted(training["ceiling_sentences_per_s"]) == ["16", "8"], training
    assert training["x_ceiling"] == round(
        training["disco_sentences_per_s"] / training["ceiling_sentences_per_s"]["8"], 3
    )
    assert rows[0]["detail"]["ceiling_sentences_per_s"] > 0 and rows[0]["detail"]["x_ceiling"] > 0, rows[0]
    for row in rows:
        assert row["value"] > 0 and row["device"] == "cpu" and row["better"] in ("higher", "lower"), row
        assert row["command"].startswith("python launchers/benchmark.py")
    assert "| st_training |" in result.stdout and f"rows written to {out}" in result.stdout
