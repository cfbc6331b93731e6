"""The memory probe behind docs/benchmarks.md's per-rank table: it sees a short-lived allocation's peak."""

import time

import pytest
import torch

from disco_dist.bench.memory import PeakSampler, smaps_rollup


def test_a_short_lived_allocation_shows_in_the_peak_and_not_after():
    before = smaps_rollup()
    assert 0 < before["uss"] <= before["pss"] <= before["rss"]
    with PeakSampler(interval=0.001) as sampler:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written: private pages
        time.sleep(0.05)
        del block
    after = smaps_rollup()
    assert sampler.peak["uss"] - before["uss"] > 48
    assert after["uss"] < sampler.peak["uss"] - 32  # given back (a block this large is its own mapping)


@pytest.mark.slow
def test_a_zero3_rank_holds_about_its_share_of_a_decoder_teacher_while_loading_and_embedding(tmp_path):
    """What the teacher adds to a rank's memory (peak USS over the same process's before the teacher is built), on
    2 ranks under ZeRO-3 with the shipped config, is below 0.65x what one process holding the whole teacher adds:
    while loading and while embedding. A random decoder whose weights dominate (537M parameters, 2,045 MiB fp32)."""
    from disco_dist.bench.memory import measure, measured_teacher
    from disco_dist.core.files import DS_CONFIGS

    folder = measured_teacher(tmp_path / "decoder", layers=40)
    config = str(DS_CONFIGS / "teacher_zero3.json")
    (one,) = measure(str(folder), config, 1, sentences=16, forwards=1)
    whole = max(one["load"]["uss"], one["embed"]["uss"]) - one["base"]["uss"]
    ranks = measure(str(folder), config, 2, sentences=16, forwards=1)
    added = {(r["rank"], phase): r[phase]["uss"] - r["base"]["uss"] for r in ranks for phase in ("load", "embed")}
    print(f"the teacher adds {whole:.0f} MiB to one process; on 2 ranks (MiB):", added)
    assert all(0.45 < r["fraction"] < 0.55 for r in ranks)
    assert max(added.values()) < 0.65 * whole, (added, whole)


def test_the_memory_probe_holds_the_teacher_in_bf16_on_a_gpu_and_fp32_on_a_cpu_unless_asked():
    """A GPU run of the probe measures the teacher as training holds it there (bf16), not in fp32 at twice the bytes."""
    from disco_dist.bench.memory import worker_precision

    assert worker_precision("device", torch.device("cuda", 0)) == "bf16"
    assert worker_precision("device", torch.device("cpu")) == "fp32"
    assert worker_precision("fp32", torch.device("cuda", 0)) == "fp32"
    assert worker_precision("bf16", torch.device("cpu")) == "bf16"
