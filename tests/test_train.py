"""End to end on 2 CPU ranks through the deepspeed launcher: loss falls, checkpoints and a final model are
written, a resumed run follows the uninterrupted one exactly, TensorBoard holds the scalars."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, assert_same_weights, build_tiny_run_inputs, scalars

from disco_dist.cluster.distributed import deepspeed_command
from disco_dist.models.encoder import Encoder
from disco_dist.train.checkpoint import complete_checkpoints
from disco_dist.train.metrics import read_sample_logs


def launch(script, args, ranks=2, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = deepspeed_command(ranks, REPO / "launchers" / script, *args)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from disco_dist.data.sts import read_sts_task

    pairs = read_sts_task("STSBenchmark", split="train")  # real sentences the tiny tokenizer can mostly cover
    unique = list(dict.fromkeys(s.strip() for s in pairs.sentences1 + pairs.sentences2))
    root, student, teacher, _ = build_tiny_run_inputs(
        tmp_path_factory.mktemp("train"), unique[:1200], shard_size=100, student_layers=4
    )  # 12 full shards of 100
    return root, student, teacher


def distill_args(root, student, teacher, run_dir, *extra):
    return [
        "--shards",
        root / "shards",
        "--student",
        student,
        "--teacher",
        teacher,
        "--run-dir",
        run_dir,
        "--batch-size",
        16,
        "--teacher-batch-size",
        64,
        "--max-steps",
        30,
        "--log-every",
        5,
        "--checkpoint-every",
        10,
        "--keep-checkpoints",
        5,
        "--queue-size",
        128,
        "--lr",
        1e-3,
        "--logit-scale-lr",
        0.05,
        "--head-init",
        "random",
        *extra,
    ]


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """The reference: 30 CKD steps on 2 ranks, checkpoints every 10, with the sample log."""
    root, student, teacher = setup
    full = tmp_path_factory.mktemp("uninterrupted") / "full"
    result = launch("distill.py", distill_args(root, student, teacher, full, "--sample-log"))
    assert result.returncode == 0 and "finished: 30 steps" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-3000:]
    )
    return full


@pytest.mark.slow
def test_distill_two_ranks_then_resume_matches_uninterrupted(setup, uninterrupted, tmp_path):
    root, student, teacher = setup
    full = uninterrupted

    # what a user finds in the run folder
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in (10, 20, 30)]
    config = json.loads((full / "config.json").read_text())
    assert config["world_size"] == 2 and config["loss"] == "ckd" and config["total_steps"] == 30
    final = Encoder.from_pretrained(full / "final")
    assert final.model.config.hidden_size == 32  # the student, without the projection head
    logged = scalars(full)
    for tag in (
        "loss/ckd",
        "loss/total",
        "train/lr",
        "train/logit_scale",
        "train/grad_norm",
        "train/queue_fill",
        "throughput/sentences_per_s",
        "throughput/tokens_per_s",
        "time/teacher_share",
        "time/wait_share",
        "time/comm_share",
        "throughput/teacher_tflops",
        "throughput/teacher_mfu",
    ):
        assert set(logged[tag]) == {5, 10, 15, 20, 25, 30}, tag
    # the online teacher's forward FLOPs over the wall time, against 2 x the matmul rate measured at start-up
    assert all(0 < mfu < 1 for mfu in logged["throughput/teacher_mfu"].values()), logged["throughput/teacher_mfu"]
    assert logged["train/queue_fill"][30] == 1.0  # 128 slots, 32 teacher embeddings per step
    # the scale has its own learning rate: at --lr 1e-3 its log could move at most ~0.03 from e in 30 steps
    assert max(abs(math.log(s / math.e)) for s in logged["train/logit_scale"].values()) > 0.15, logged[
        "train/logit_scale"
    ]

    # resume from step 20 into a fresh folder: the same losses at 25 and 30, the same final weights
    resumed = tmp_path / "resumed"
    result = launch(
        "distill.py", distill_args(root, student, teacher, resumed, "--resume", full / "checkpoints" / "step-00000020")
    )
    assert result.returncode == 0 and "resumed from" in result.stdout and "at step 20" in result.stdout, result.stderr[
        -3000:
    ]
    again = scalars(resumed)
    for step in (25, 30):
        assert again["loss/ckd"][step] == pytest.approx(logged["loss/ckd"][step], rel=1e-5, abs=1e-6)
        assert again["train/logit_scale"][step] == pytest.approx(logged["train/logit_scale"][step], rel=1e-5)
    assert 5 not in again["loss/ckd"]
    assert_same_final_weights(full, resumed)

    # a different world size would see other data and other optimizer partitions: refused, in one line
    result = launch(
        "distill.py",
        distill_args(root, student, teacher, tmp_path / "one-rank", "--resume", full / "checkpoints" / "step-00000020"),
        ranks=1,
    )
    assert result.returncode == 2 and "written by 2 ranks, this run has 1" in result.stderr, result.stderr[-2000:]

    # the scale's own optimizer group dropped on resume: refused in one line, not a deep optimizer traceback
    args = distill_args(
        root, student, teacher, tmp_path / "no-scale-lr", "--resume", full / "checkpoints" / "step-00000020"
    )
    del args[args.index("--logit-scale-lr") : args.index("--logit-scale-lr") + 2]
    result = launch("distill.py", args)
    assert result.returncode == 2 and "resume with the run's own --logit-scale-lr" in result.stderr, result.stderr[
        -2000:
    ]

    # the word embeddings frozen on resume: the same groups, but the optimizer state would not fit; one line too
    resume = ("--resume", full / "checkpoints" / "step-00000020", "--freeze-word-embeddings")
    result = launch("distill.py", distill_args(root, student, teacher, tmp_path / "frozen", *resume))
    assert result.returncode == 2 and "--freeze-word-embeddings" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def assert_same_final_weights(run_a, run_b):
    weights = [dict(Encoder.from_pretrained(run / "final").named_parameters()) for run in (run_a, run_b)]
    assert_same_weights(*weights)


@pytest.mark.slow
def test_rank_killed_mid_step_stops_the_run_and_resume_matches_uninterrupted(setup, uninterrupted, tmp_path):
    """SIGKILL to rank 1 in the middle of step 26: the launcher ends the other rank and fails promptly;
    --resume auto continues from step 20 and ends with the uninterrupted run's weights, having trained on
    every batch exactly once (the sample logs equal the uninterrupted run's)."""
    root, student, teacher = setup
    run = tmp_path / "killed"
    os.environ["DISCO_KILL_RANK_AT_STEP"] = "1:26"
    try:
        result = launch("distill.py", distill_args(root, student, teacher, run, "--sample-log"), timeout=300)
    finally:
        del os.environ["DISCO_KILL_RANK_AT_STEP"]
    ended = time.time()
    assert result.returncode != 0 and "finished" not in result.stdout, result.stdout[-2000:]
    assert "error: rank 0: lost contact with another rank" in result.stderr and "Traceback" not in result.stderr
    assert "the last complete checkpoint is" in result.stderr and "step-00000020" in result.stderr
    assert ended - float((run / "killed-at").read_text()) < 60  # no hang: bounded by the launcher / gloo
    assert [p.name for p in complete_checkpoints(run)] == ["step-00000010", "step-00000020"]
    logged_before_kill = read_sample_logs(run)
    assert max(step for _, _, _, step, _, _ in logged_before_kill) >= 21  # steps past the checkpoint were lost

    result = launch("distill.py", distill_args(root, student, teacher, run, "--sample-log", "--resume", "auto"))
    assert result.returncode == 0 and "at step 20" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]
    assert_same_final_weights(uninterrupted, run)
    rows = read_sample_logs(run)
    assert rows == read_sample_logs(uninterrupted)
    keys = [k for *_, batch_keys in rows for k in batch_keys]
    assert len(rows) == 2 * 30 and len(keys) == len(set(keys)) == 2 * 30 * 16  # none twice, none skipped


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mse_loss_falls_with_cached_teacher(setup, tmp_path, precision):
    """Also in bf16 (autocast on fp32 weights): the loss falls as far, the run records it, the saved student is fp32."""
    root, student, teacher = setup
    cached = tmp_path / "cached"
    result = launch(
        "cache_teacher.py",
        ["--shards", root / "shards", "--teacher", teacher, "--out", cached, "--teacher-batch-size", 64],
    )
    assert result.returncode == 0 and "with teacher embeddings" in result.stdout, result.stderr[-3000:]
    run = tmp_path / "mse"
    args = [
        "--shards",
        cached,
        "--student",
        student,
        "--run-dir",
        run,
        "--batch-size",
        16,
        "--epochs",
        3,
        "--log-every",
        5,
        "--loss",
        "mse",
        "--lr",
        1e-3,
        "--head-init",
        "random",
        "--checkpoint-every",
        0,
        "--precision",
        precision,
    ]
    result = launch("distill.py", args)
    assert result.returncode == 0 and "finished" in result.stdout, result.stderr[-3000:]
    decision = json.loads((run / "config.json").read_text())["precision_decision"]
    assert decision == {"name": precision, "requested": precision, "reason": "asked for"}
    saved = Encoder.from_pretrained(run / "final")
    assert all(p.dtype == torch.float32 for p in saved.parameters())
    losses = scalars(run)["loss/mse"]
    steps = sorted(losses)
    assert steps[-1] == 3 * (1200 // 2 // 16)  # 3 epochs of 37 batches per rank
    assert losses[steps[-1]] < 0.5 * losses[steps[0]]
    assert scalars(run)["time/teacher_share"][steps[-1]] == 0.0  # cached: the teacher never runs
    assert "throughput/teacher_mfu" not in scalars(run)


def test_frozen_word_embeddings_stay_as_they_were_while_the_rest_trains(setup, tmp_path):
    """--freeze-word-embeddings (2 ranks, online teacher): the saved student's word embeddings equal the initial
    ones bit for bit, while its other matrices moved."""
    root, student, teacher = setup
    run = tmp_path / "frozen"
    extra = ("--freeze-word-embeddings", "--max-steps", 8, "--checkpoint-every", 0)
    result = launch("distill.py", distill_args(root, student, teacher, run, *extra))
    assert result.returncode == 0 and "finished: 8 steps" in result.stdout, result.stderr[-3000:]
    before, after = (dict(Encoder.from_pretrained(m).model.named_parameters()) for m in (student, run / "final"))
    words = "embeddings.word_embeddings.weight"
    assert torch.equal(after[words], before[words])
    moved = [name for name, p in after.items() if p.ndim == 2 and name != words and not torch.equal(p, before[name])]
    assert len(moved) >= 10, moved  # the layers' matrices (and position embeddings) trained


def test_profile_writes_each_rank_s_trace_and_top_ops_for_the_steps_asked_and_trains_the_same(setup, tmp_path):
    """--profile FIRST:LAST (2 ranks): the cache pass and stage 1 each write, per rank, a Chrome trace and a table of
    the ops that took the most time over the window, and say so in one line; the profiled run's weights equal an
    unprofiled run's. A window that is not FIRST < LAST is one line naming the flag."""
    import gzip

    root, student, teacher = setup
    cached = tmp_path / "cached"
    cache = ["--shards", root / "shards", "--teacher", teacher, "--out", cached, "--profile", "0:1"]
    result = launch("cache_teacher.py", cache)
    assert result.returncode == 0 and "profiled sentence groups 1-1 on rank 0 (cpu)" in result.stdout, (
        result.stdout[-2000:] + result.stderr[-3000:]
    )
    assert "aten::" in (cached / "profile" / "rank-1.top.txt").read_text()
    runs, said = {}, {}
    for name, extra in (("profiled", ["--profile", "2:4"]), ("plain", [])):
        runs[name] = tmp_path / name
        args = ["--shards", cached, "--student", student, "--run-dir", runs[name], "--batch-size", 16]
        args += ["--max-steps", 6, "--checkpoint-every", 0, "--head-init", "random", "--lr", 1e-3, *extra]
        result = launch("distill.py", args)
        assert result.returncode == 0 and "finished: 6 steps" in result.stdout, result.stderr[-3000:]
        said[name] = result.stdout.count("profiled steps 3-4 on rank 0 (cpu): ")
    assert said == {"profiled": 1, "plain": 0}  # one line, from rank 0
    profile = runs["profiled"] / "profile"
    for rank in (0, 1):
        top = (profile / f"rank-{rank}.top.txt").read_text()
        assert top.startswith(f"steps 3-4 on rank {rank} (cpu): ") and "aten::mm" in top, top[:2000]
        events = json.loads(gzip.decompress((profile / f"rank-{rank}.trace.json.gz").read_bytes()))["traceEvents"]
        assert any(event.get("name") == "aten::mm" for event in events)
    assert not (runs["plain"] / "profile").exists()
    final = {name: dict(Encoder.from_pretrained(run / "final").model.named_parameters()) for name, run in runs.items()}
    assert_same_weights(final["profiled"], final["plain"])

    bad = subprocess.run(
        [sys.executable, REPO / "launchers" / "distill.py", "--profile", "4:2"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--profile: '4:2': give FIRST:LAST, 0 <= FIRST < LAST" in bad.stderr, bad.stderr


def finetune_args(student, run_dir, *extra):
    return [
        "--student",
        student,
        "--run-dir",
        run_dir,
        "--batch-size",
        8,
        "--max-steps",
        20,
        "--max-triplets",
        400,
        "--log-every",
        5,
        "--eval-every",
        10,
        "--checkpoint-every",
        10,
        "--keep-checkpoints",
        5,
        "--lr",
        1e-3,
        *extra,
    ]


@pytest.mark.slow
def test_finetune_two_ranks_keeps_best_and_resumes_exactly(setup, tmp_path):
    _, student, _ = setup
    full = tmp_path / "full"
    result = launch("finetune.py", finetune_args(student, full))
    assert result.returncode == 0 and "finished: 20 steps" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-3000:]
    )
    logged = scalars(full)
    assert set(logged["eval/stsb_dev_spearman"]) == {10, 20}
    assert set(logged["loss/sup_contrastive"]) == {5, 10, 15, 20}
    summary = json.loads((full / "train_summary.json").read_text())
    assert summary["best_dev"] == pytest.approx(max(logged["eval/stsb_dev_spearman"].values()), abs=1e-4)
    from disco_dist.evaluation.evaluate import stsb_dev_spearman

    assert stsb_dev_spearman(Encoder.from_pretrained(full / "final")) == pytest.approx(summary["best_dev"], abs=1e-3)

    # the resumed run's summary counts the training time of the part before the checkpoint too
    state_file = full / "checkpoints" / "step-00000010" / "trainer_state.json"
    saved_state = json.loads(state_file.read_text())
    assert 0 < saved_state["seconds"] < summary["seconds"]
    state_file.write_text(json.dumps({**saved_state, "seconds": 5000.0}))
    resumed = tmp_path / "resumed"
    started = time.time()
    result = launch("finetune.py", finetune_args(student, resumed, "--resume", full / "checkpoints" / "step-00000010"))
    assert result.returncode == 0 and "at step 10" in result.stdout, result.stderr[-3000:]
    assert 5000 < json.loads((resumed / "train_summary.json").read_text())["seconds"] < 5000 + time.time() - started
    again = scalars(resumed)
    for step in (15, 20):
        assert again["loss/sup_contrastive"][step] == pytest.approx(logged["loss/sup_contrastive"][step], rel=1e-5)


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_then_the_run_stops_with_a_checkpoint(setup, tmp_path):
    root, student, teacher = setup
    run = tmp_path / "nan"
    base = [
        "--shards",
        root / "shards",
        "--student",
        student,
        "--teacher",
        teacher,
        "--batch-size",
        16,
        "--max-steps",
        12,
        "--log-every",
        4,
        "--checkpoint-every",
        0,
        "--queue-size",
        64,
        "--head-init",
        "random",
        "--max-bad-steps",
        3,
    ]
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
        assert result.returncode == 2 and "NaN or inf 3 times in a row at step 5" in result.stderr, result.stderr[
            -3000:
        ]
        assert (stopped / "checkpoints" / "step-00000005" / "COMPLETE").exists()
    finally:
        del os.environ["DISCO_INJECT_NAN_AT_BATCHES"]


@pytest.mark.slow
def test_zero2_student_engine_resumes_exactly(setup, tmp_path):
    """The shipped ZeRO-2 config (optimizer states partitioned over the ranks) trains and resumes exactly too."""
    root, student, teacher = setup
    zero2 = ["--ds-config", REPO / "ds_configs" / "student_zero2.json", "--max-steps", 20]
    full = tmp_path / "full"
    result = launch("distill.py", distill_args(root, student, teacher, full, *zero2))
    assert result.returncode == 0 and "finished: 20 steps" in result.stdout, result.stderr[-3000:]
    resumed = tmp_path / "resumed"
    result = launch(
        "distill.py",
        distill_args(root, student, teacher, resumed, *zero2, "--resume", full / "checkpoints" / "step-00000010"),
    )
    assert result.returncode == 0 and "at step 10" in result.stdout, result.stderr[-3000:]
    logged, again = scalars(full), scalars(resumed)
    for step in (15, 20):
        assert again["loss/ckd"][step] == pytest.approx(logged["loss/ckd"][step], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_bad_shard_stops_the_run_or_is_skipped_on_every_rank(setup, tmp_path):
    """A truncated shard and one replaced after indexing (stale index): by default the run stops before
    training with one line naming them; with --bad-shards skip both ranks leave them out and finish."""
    import shutil

    root, student, teacher = setup
    shards = tmp_path / "shards"
    shutil.copytree(root / "shards", shards)
    truncated = shards / "shard-000003.tar"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    shutil.copy(shards / "shard-000001.tar", shards / "shard-000007.tar")  # a valid tar, not the indexed one
    args = [
        "--shards",
        shards,
        "--student",
        student,
        "--teacher",
        teacher,
        "--batch-size",
        16,
        "--max-steps",
        6,
        "--checkpoint-every",
        0,
        "--queue-size",
        64,
        "--head-init",
        "random",
        "--log-every",
        3,
    ]

    result = launch("distill.py", [*args, "--run-dir", tmp_path / "stop"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (
        "2 shard(s)" in errors[0]
        and "shard-000003.tar, shard-000007.tar" in errors[0]
        and "--bad-shards skip" in errors[0]
    )

    result = launch("distill.py", [*args, "--run-dir", tmp_path / "skip", "--bad-shards", "skip"], timeout=300)
    assert result.returncode == 0 and "finished: 6 steps" in result.stdout, (
        result.stdout[-2000:] + result.stderr[-3000:]
    )
    assert "skipping them (200 of 1200 sentences)" in result.stdout
    summary = json.loads((tmp_path / "skip" / "train_summary.json").read_text())
    assert summary["skipped_bad_shards"] == ["shard-000003.tar", "shard-000007.tar"]


@pytest.fixture
def small_disk(tmp_path):
    """A 1.2 MiB tmpfs: room for the run folder and one checkpoint of the tiny student (0.7 MiB), not two."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.slow
def test_disk_full_at_a_checkpoint_stops_cleanly_and_the_previous_one_resumes(
    setup, uninterrupted, small_disk, tmp_path
):
    import shutil

    root, student, teacher = setup
    run = small_disk / "run"
    result = launch("distill.py", distill_args(root, student, teacher, run), timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "not enough space for checkpoint step-00000020" in errors[0] and "step-00000010 is intact" in errors[0]
    assert [p.name for p in complete_checkpoints(run)] == ["step-00000010"]
    assert not list((run / "checkpoints").glob(".*partial"))  # nothing half-written left behind

    moved = tmp_path / "run"  # the user frees space (here: moves the run) and resumes
    shutil.copytree(run, moved)
    result = launch("distill.py", distill_args(root, student, teacher, moved, "--resume", "auto"))
    assert result.returncode == 0 and "at step 10" in result.stdout, result.stderr[-3000:]
    assert_same_final_weights(uninterrupted, moved)
