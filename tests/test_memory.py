"""The memory probe behind docs/benchmarks.md's per-rank table: it sees a short-lived allocation's peak."""

import time

import torch

from disco_dist.memory import PeakSampler, smaps_rollup


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
