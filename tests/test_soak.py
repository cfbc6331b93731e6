"""The chaos soak (tests/soak.py) at its short size: every kind of fault injected at least once into one CKD job on
two of the local cluster's nodes, each ends in automatic recovery, and the job ends with an uninterrupted run's
weights and sample logs."""

import pytest
from soak import ENDS_THE_RUN, FAULTS, soak


@pytest.mark.slow
def test_a_short_chaos_soak_recovers_from_every_fault_and_ends_as_if_uninterrupted(tmp_path):
    result = soak(minutes=3, seed=7, out=tmp_path)  # asserts the weights and sample logs, COMPLETED
    injected = [row for row in result["faults"] if row["recovered"] is not None]
    assert {row["kind"] for row in injected} == set(FAULTS), result["faults"]
    assert all(row["recovered"] for row in injected)
    assert all(row["requeued"] == (row["kind"] in ENDS_THE_RUN) for row in injected)
    assert result["weights_equal"] and result["sample_logs_equal"]
