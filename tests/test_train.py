"""End to end on 2 CPU ranks through the deepspeed launcher: loss falls, checkpoints and a final model are
written, a resumed run follows the uninterrupted one exactly, TensorBoard holds the scalars."""
import json
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from disco_dist.encoder import Encoder

from conftest import REPO, build_tiny_run_inputs
from dist_utils import free_port

DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")


def launch(script, args, ranks=2, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(REPO / "launchers" / script), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    return result


def scalars(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from disco_dist.data import read_sts_task

    pairs = read_sts_task("STSBenchmark", split="train")  # real sentences the tiny tokenizer can mostly cover
    unique = list(dict.fromkeys(s.strip() for s in pairs.sentences1 + pairs.sentences2))
    root, student, teacher, _ = build_tiny_run_inputs(tmp_path_factory.mktemp("train"), unique[:1200],
                                                      shard_size=100, student_layers=4)  # 12 full shards of 100
    return root, student, teacher


def distill_args(root, student, teacher, run_dir, *extra):
    return ["--shards", root / "shards", "--student", student, "--teacher", teacher, "--run-dir", run_dir,
            "--batch-size", 16, "--teacher-batch-size", 64, "--max-steps", 30, "--log-every", 5,
            "--checkpoint-every", 10, "--keep-checkpoints", 5, "--queue-size", 128, "--lr", 1e-3,
            "--head-init", "random", *extra]


def test_distill_two_ranks_then_resume_matches_uninterrupted(setup, tmp_path):
    root, student, teacher = setup
    full = tmp_path / "full"
    result = launch("distill.py", distill_args(root, student, teacher, full))
    assert result.returncode == 0 and "finished: 30 steps" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]

    # what a user finds in the run folder
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in (10, 20, 30)]
    config = json.loads((full / "config.json").read_text())
    assert config["world_size"] == 2 and config["loss"] == "ckd" and config["total_steps"] == 30
    final = Encoder.from_pretrained(full / "final")
    assert final.model.config.hidden_size == 32  # the student, without the projection head
    logged = scalars(full)
    for tag in ("loss/ckd", "loss/total", "train/lr", "train/logit_scale", "train/grad_norm", "train/queue_fill",
                "throughput/sentences_per_s", "throughput/tokens_per_s", "time/teacher_share", "time/comm_share"):
        assert set(logged[tag]) == {5, 10, 15, 20, 25, 30}, tag
    assert logged["train/queue_fill"][30] == 1.0  # 128 slots, 32 teacher embeddings per step

    # resume from step 20 into a fresh folder: the same losses at 25 and 30, the same final weights
    resumed = tmp_path / "resumed"
    result = launch("distill.py", distill_args(root, student, teacher, resumed, "--resume",
                                               full / "checkpoints" / "step-00000020"))
    assert result.returncode == 0 and "resumed from" in result.stdout and "at step 20" in result.stdout, result.stderr[-3000:]
    again = scalars(resumed)
    for step in (25, 30):
        assert again["loss/ckd"][step] == pytest.approx(logged["loss/ckd"][step], rel=1e-5, abs=1e-6)
        assert again["train/logit_scale"][step] == pytest.approx(logged["train/logit_scale"][step], rel=1e-5)
    assert 5 not in again["loss/ckd"]
    for a, b in zip(Encoder.from_pretrained(full / "final").parameters(), Encoder.from_pretrained(resumed / "final").parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # a different world size would see other data and other optimizer partitions: refused, in one line
    result = launch("distill.py", distill_args(root, student, teacher, tmp_path / "one-rank", "--resume",
                                               full / "checkpoints" / "step-00000020"), ranks=1)
    assert result.returncode == 2 and "written by 2 ranks, this run has 1" in result.stderr, result.stderr[-2000:]


def test_mse_loss_falls_with_cached_teacher(setup, tmp_path):
    root, student, teacher = setup
    cached = tmp_path / "cached"
    result = launch("cache_teacher.py", ["--shards", root / "shards", "--teacher", teacher, "--out", cached,
                                          "--teacher-batch-size", 64])
    assert result.returncode == 0 and "with teacher embeddings" in result.stdout, result.stderr[-3000:]
    run = tmp_path / "mse"
    args = ["--shards", cached, "--student", student, "--run-dir", run, "--batch-size", 16, "--epochs", 3,
            "--log-every", 5, "--loss", "mse", "--lr", 1e-3, "--head-init", "random", "--checkpoint-every", 0]
    result = launch("distill.py", args)
    assert result.returncode == 0 and "finished" in result.stdout, result.stderr[-3000:]
    losses = scalars(run)["loss/mse"]
    steps = sorted(losses)
    assert steps[-1] == 3 * (1200 // 2 // 16)  # 3 epochs of 37 batches per rank
    assert losses[steps[-1]] < 0.5 * losses[steps[0]]
    assert scalars(run)["time/teacher_share"][steps[-1]] == 0.0  # cached: the teacher never runs


def finetune_args(student, run_dir, *extra):
    return ["--student", student, "--run-dir", run_dir, "--batch-size", 8, "--max-steps", 20, "--max-triplets", 400,
            "--log-every", 5, "--eval-every", 10, "--checkpoint-every", 10, "--keep-checkpoints", 5, "--lr", 1e-3, *extra]


def test_finetune_two_ranks_keeps_best_and_resumes_exactly(setup, tmp_path):
    _, student, _ = setup
    full = tmp_path / "full"
    result = launch("finetune.py", finetune_args(student, full))
    assert result.returncode == 0 and "finished: 20 steps" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    logged = scalars(full)
    assert set(logged["eval/stsb_dev_spearman"]) == {10, 20}
    assert set(logged["loss/sup_contrastive"]) == {5, 10, 15, 20}
    summary = json.loads((full / "train_summary.json").read_text())
    assert summary["best_dev"] == pytest.approx(max(logged["eval/stsb_dev_spearman"].values()), abs=1e-4)
    from disco_dist.evaluate import stsb_dev_spearman

    assert stsb_dev_spearman(Encoder.from_pretrained(full / "final")) == pytest.approx(summary["best_dev"], abs=1e-3)

    resumed = tmp_path / "resumed"
    result = launch("finetune.py", finetune_args(student, resumed, "--resume", full / "checkpoints" / "step-00000010"))
    assert result.returncode == 0 and "at step 10" in result.stdout, result.stderr[-3000:]
    again = scalars(resumed)
    for step in (15, 20):
        assert again["loss/sup_contrastive"][step] == pytest.approx(logged["loss/sup_contrastive"][step], rel=1e-5)


def test_nonfinite_losses_are_skipped_then_the_run_stops_with_a_checkpoint(setup, tmp_path):
    root, student, teacher = setup
    run = tmp_path / "nan"
    base = ["--shards", root / "shards", "--student", student, "--teacher", teacher, "--batch-size", 16,
            "--max-steps", 12, "--log-every", 4, "--checkpoint-every", 0, "--queue-size", 64, "--head-init", "random",
            "--max-bad-steps", 3]
    os.environ["DISCO_INJECT_NAN_AT_BATCHES"] = "2,3"  # two bad batches in a row: skipped, the run goes on
    try:
        result = launch("distill.py", base + ["--run-dir", run])
        assert result.returncode == 0 and "finished: 12 steps" in result.stdout, result.stderr[-3000:]
        summary = json.loads((run / "train_summary.json").read_text())
        assert summary["skipped_nonfinite_steps"] == 2
        assert all(v == v for v in scalars(run)["loss/total"].values())  # no NaN reached the logged losses

        os.environ["DISCO_INJECT_NAN_AT_BATCHES"] = "5,6,7"  # 3 in a row after 5 good steps -> stop
        stopped = tmp_path / "stopped"
        result = launch("distill.py", base + ["--run-dir", stopped])
        assert result.returncode == 2 and "NaN or inf 3 times in a row at step 5" in result.stderr, result.stderr[-3000:]
        assert (stopped / "checkpoints" / "step-00000005" / "COMPLETE").exists()
    finally:
        del os.environ["DISCO_INJECT_NAN_AT_BATCHES"]


def test_zero2_student_engine_resumes_exactly(setup, tmp_path):
    """The shipped ZeRO-2 config (optimizer states partitioned over the ranks) trains and resumes exactly too."""
    root, student, teacher = setup
    zero2 = ["--ds-config", REPO / "ds_configs" / "student_zero2.json", "--max-steps", 20]
    full = tmp_path / "full"
    result = launch("distill.py", distill_args(root, student, teacher, full, *zero2))
    assert result.returncode == 0 and "finished: 20 steps" in result.stdout, result.stderr[-3000:]
    resumed = tmp_path / "resumed"
    result = launch("distill.py", distill_args(root, student, teacher, resumed, *zero2, "--resume",
                                               full / "checkpoints" / "step-00000010"))
    assert result.returncode == 0 and "at step 10" in result.stdout, result.stderr[-3000:]
    logged, again = scalars(full), scalars(resumed)
    for step in (15, 20):
        assert again["loss/ckd"][step] == pytest.approx(logged["loss/ckd"][step], rel=1e-5, abs=1e-6)
