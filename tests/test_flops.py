"""The FLOPs a teacher pass reports (disco_dist/models/flops.py), and the pass reporting them with its MFU."""

import json

import pytest
from conftest import build_tiny_model, run, scalars

from disco_dist.data.make_shards import make_shards
from disco_dist.data.shards import iter_shard_samples, read_index
from disco_dist.models.encoder import Encoder
from disco_dist.models.flops import ForwardFlops


def test_forward_flops_count_every_linear_weight_per_real_token_and_attention_per_square():
    from transformers import BertConfig, BertModel

    model = BertModel(
        BertConfig(vocab_size=30, hidden_size=4, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8)
    )
    # per layer: q, k, v, o 4x4 each (64) + 4x8 + 8x4 (64) = 128 weights; 2 layers + the 4x4 pooler: 272 -> 544 a token
    # attention: 4 x 2 layers x (2 heads x 2 wide) = 32 per squared length
    assert ForwardFlops(model)([3]) == 544 * 3 + 32 * 9
    assert ForwardFlops(model)([3, 5]) == 544 * 8 + 32 * (9 + 25)


def test_the_cache_pass_reports_real_tokens_flops_and_mfu_in_its_line_index_and_tensorboard(tmp_path):
    model_dir = build_tiny_model(tmp_path / "teacher", hidden=64, layers=2, seed=3).resolve()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the {i} dog plays" + " in a park" * (i % 9) for i in range(40)) + "\n")
    make_shards(corpus, tmp_path / "src", shard_size=10, log=lambda *_: None)
    result = run("cache_teacher.py", "--shards", tmp_path / "src", "--out", tmp_path / "out", "--teacher", model_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    teacher = json.loads((tmp_path / "out" / "index.json").read_text())["teacher"]

    encoder = Encoder.from_pretrained(model_dir, max_length=128)
    lengths = encoder.token_counts([text for text, _ in iter_shard_samples(read_index(tmp_path / "src"))])
    assert teacher["tokens"] == sum(lengths)
    assert teacher["flops"] == ForwardFlops(encoder.model)(lengths)
    assert 0 < teacher["mfu"] < 1 and teacher["matmul_tflops"] > 0
    # the index rounds seconds to 0.01 s (a pass of a few hundredths here), the rate to 1 GFLOP/s and MFU to 1e-4
    seconds, peak = teacher["seconds"], teacher["matmul_tflops"] * 1e12
    low = teacher["flops"] / (seconds + 0.005) / (peak + 5e8) - 5e-5
    high = teacher["flops"] / max(seconds - 0.005, 1e-3) / (peak - 5e8) + 5e-5
    assert low <= teacher["mfu"] <= high, (low, teacher["mfu"], high)
    last = result.stdout.strip().splitlines()[-1]
    assert f"{teacher['tokens']:,} real tokens" in last and f"MFU {teacher['mfu']:.1%} of 1 x" in last, last
    logged = scalars(tmp_path / "out")
    assert logged["cache/mfu"][0] == pytest.approx(teacher["mfu"]) and logged["cache/tokens_per_s"][0] > 0


def test_the_step_line_and_tensorboard_show_an_online_teacher_s_mfu(tmp_path, capsys):
    """Metrics over one interval: the teacher's forward FLOPs over the interval's wall time and one device's rate."""
    import time

    import torch

    from disco_dist.train.metrics import Metrics, Stopwatch

    metrics = Metrics(tmp_path / "tensorboard", progress_total=10, peak_flops_per_s=1e12)
    started = time.perf_counter()
    metrics.record({"ckd": torch.tensor(1.0)}, 8, 100, Stopwatch(), teacher_flops=2e10)
    time.sleep(0.05)
    metrics.flush(1, {})
    seconds = time.perf_counter() - started
    metrics.close()
    mfu = scalars(tmp_path)["throughput/teacher_mfu"][1]
    assert 2e10 / seconds / 1e12 <= mfu <= 2e10 / 0.05 / 1e12  # at most 40%, over at least the 50 ms slept
    assert f"(MFU {mfu:.1%})" in capsys.readouterr().out


def test_measuring_the_matmul_rate_leaves_a_run_s_random_state_alone():
    """A run measures it at start-up (an online teacher's MFU): its dropout and initialisation must not change."""
    import torch

    from disco_dist.models.flops import matmul_rate

    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    assert matmul_rate(torch.device("cpu"), size=64, seconds=0.01) > 0
    assert torch.equal(torch.rand(4), expected)
