"""Between log steps the training loop never makes the host wait for the device (on a GPU, every such wait drains
the queue of kernels and the step becomes bound by the host). Counted on the CPU by tests/host_sync_probe.py."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, build_tiny_run_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    sentences = [f"sentence {i} says {' '.join(['word'] * (i % 9))} about the park" for i in range(400)]
    return build_tiny_run_inputs(tmp_path_factory.mktemp("syncs"), sentences, shard_size=100)


def probe(tmp_path, command: str, *argv, env=None) -> dict:
    out = tmp_path / "calls.json"
    result = subprocess.run(
        [sys.executable, REPO / "tests" / "host_sync_probe.py", out, command, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert result.returncode == 0 and out.exists(), result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("nan_batches", ["", "3,4"], ids=["clean", "two-nonfinite-steps"])
def test_distill_steps_between_log_steps_never_wait_for_the_device(inputs, tmp_path, nan_batches):
    """CKD with an online teacher, the queue and a learnable scale, one rank: 12 steps logged every 6. Every call
    that would wait for a GPU (`.item()`, `float(tensor)`, a blocking `.to(device)`, a synchronize, a barrier)
    happens at a log step, in the host's data path or in the one read of a step's verdict a step later; with
    non-finite losses the skipped steps are decided on the device and counted the same way."""
    root, student, teacher, _ = inputs
    found = probe(
        tmp_path,
        "distill",
        *("--shards", root / "shards", "--student", student, "--teacher", teacher, "--run-dir", tmp_path / "run"),
        *("--batch-size", 8, "--teacher-batch-size", 16, "--max-steps", 12, "--log-every", 6),
        *("--checkpoint-every", 0, "--queue-size", 32, "--head-init", "random", "--progress", "off"),
        env={"DISCO_INJECT_NAN_AT_BATCHES": nan_batches},
    )
    assert found["steps"] == 12 + (2 if nan_batches else 0), found["steps"]
    assert found["calls"] == [], json.dumps(found["calls"][:5], indent=1)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 12 and summary["skipped_nonfinite_steps"] == (2 if nan_batches else 0)


def test_finetune_steps_between_log_steps_never_wait_for_the_device(inputs, tmp_path, data_root):
    """Supervised SimCSE on NLI triplets, one rank, 8 steps logged every 4: the same promise."""
    root, student, _, _ = inputs
    found = probe(
        tmp_path,
        "finetune",
        *("--student", student, "--run-dir", tmp_path / "ft", "--data-root", data_root),
        *("--batch-size", 8, "--max-steps", 8, "--log-every", 4, "--max-triplets", 200, "--progress", "off"),
    )
    assert found["steps"] == 8 and found["calls"] == [], json.dumps(found["calls"][:5], indent=1)
