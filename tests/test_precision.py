"""--precision: fp32 and bf16 as asked; auto by a matmul probe on a CPU (rank 0 decides, recorded); a bf16
student computes under autocast on fp32 weights and gives fp32 embeddings and gradients."""

import torch
from conftest import PROBE_SENTENCES, run_on_ranks

from disco_dist.models import precision
from disco_dist.models.encoder import Encoder
from disco_dist.train.student import Student

CPU = torch.device("cpu")


def test_asked_precisions_are_kept_and_auto_follows_the_measured_matmul_rates(monkeypatch):
    assert precision.resolve_precision("fp32", CPU).name == "fp32"
    assert precision.resolve_precision("bf16", CPU).name == "bf16"
    for bf16_rate, chosen in ((300.0, "bf16"), (149.0, "fp32"), (60.0, "fp32")):
        monkeypatch.setattr(
            precision, "matmul_gflops", lambda dtype, r=bf16_rate: r if dtype == torch.bfloat16 else 100.0
        )
        decided = precision.resolve_precision("auto", CPU)
        assert decided.name == chosen
        record = decided.record()
        assert record["requested"] == "auto" and record["fp32_gflops"] == 100.0 and record["bf16_gflops"] == bf16_rate
        assert f"{bf16_rate / 100:.2f}x" in record["reason"]


def test_the_real_probe_measures_both_rates_in_milliseconds():
    import time

    start = time.perf_counter()
    decided = precision.resolve_precision("auto", CPU)
    assert time.perf_counter() - start < 5.0  # tens of milliseconds alone; generous for a loaded machine
    assert decided.fp32_gflops > 0 and decided.bf16_gflops > 0
    ratio = decided.bf16_gflops / decided.fp32_gflops
    assert decided.bf16 == (ratio >= precision.BF16_MIN_SPEEDUP)


def test_the_default_comes_from_DISCO_PRECISION(monkeypatch):
    from disco_dist.cli.config import distill_parser

    monkeypatch.setenv("DISCO_PRECISION", "bf16")
    assert distill_parser().parse_args(["--shards", "x"]).precision == "bf16"
    monkeypatch.delenv("DISCO_PRECISION")
    assert distill_parser().parse_args(["--shards", "x"]).precision == "auto"


def test_a_bad_DISCO_PRECISION_is_one_line_naming_it():
    from conftest import assert_one_line, run

    result = run("distill.py", "--shards", "x", env={"DISCO_PRECISION": "fp16"})
    assert_one_line(result, "DISCO_PRECISION=fp16", "fp32", "bf16")


def _decide(rank, world_size):
    # each rank's probe would differ; rank 0's decision holds for all
    if rank == 1:
        precision.matmul_gflops = lambda dtype: 1e9 if dtype == torch.bfloat16 else 1.0
    else:
        precision.matmul_gflops = lambda dtype: 1.0
    return precision.resolve_precision("auto", CPU).name


def test_every_rank_gets_rank_zeros_decision(tmp_path):
    assert run_on_ranks(_decide, 2, tmp_path) == ["fp32", "fp32"]


def test_a_bf16_student_keeps_fp32_weights_and_gives_fp32_embeddings_close_to_fp32(tiny_student):
    head = torch.nn.Linear(32, 48)
    fp32 = Student(Encoder.from_pretrained(tiny_student), head)
    bf16 = Student(Encoder.from_pretrained(tiny_student), head, bf16=True)
    fp32.eval(), bf16.eval()
    batch = fp32.encoder.tokenize(PROBE_SENTENCES)
    (a,) = fp32(batch["input_ids"], batch["attention_mask"])
    (b,) = bf16(batch["input_ids"], batch["attention_mask"])
    assert a.dtype == b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, b.detach()).min() > 0.99
    assert not torch.equal(a, b)  # it did compute in bf16
    b.sum().backward()
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert all(p.grad.dtype == torch.float32 for p in bf16.parameters() if p.grad is not None)


def test_a_resumed_auto_run_keeps_the_precision_it_started_with(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    from disco_dist.train.loop import run_precision

    monkeypatch.setattr(precision, "matmul_gflops", lambda dtype: 1.0)  # a probe now would say fp32
    started = {"name": "bf16", "requested": "auto", "reason": "auto: ...", "fp32_gflops": 1.0, "bf16_gflops": 2.0}
    (tmp_path / "config.json").write_text(json.dumps({"precision_decision": started}))
    env = SimpleNamespace(device=CPU)
    assert run_precision("auto", env, tmp_path, resuming=True).record() == started
    assert run_precision("auto", env, tmp_path, resuming=False).name == "fp32"  # a new run decides anew
    assert run_precision("fp32", env, tmp_path, resuming=True).name == "fp32"
