"""Heartbeats at many ranks: each rank watches one neighbour (3 store calls a beat, however many ranks), a silent
rank is found within the peer time-out and named by every other rank, finished ranks are skipped, not lost."""

import time

import torch

from disco_dist.bench.peer_watch_load import CountedStore, Env, measure, recorder
from disco_dist.cluster.peer_watch import PeerWatch
from disco_dist.cluster.resilience import lost_peer_error


def test_a_silent_rank_among_64_is_found_within_the_time_out_and_named_by_every_rank():
    row = measure(world=64, interval=0.2, patience=2.0, steady=1.0)
    assert row["calls_per_rank_per_beat"] <= 3.3  # O(W): 3 calls a rank a beat (all-pairs was 127 at 64 ranks)
    assert row["named_right"] == row["others"] == 63
    assert row["all_knew_s"] is not None and row["all_knew_s"] < 2.0 + 4 * 0.2 + 1.0


def test_finished_ranks_are_skipped_not_lost_and_a_silent_rank_behind_them_is_found():
    master = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    world, knew = 6, {}
    stores = [CountedStore(master.port, 2.0) for _ in range(world)]
    on_lost = recorder(knew)
    watches = [PeerWatch(Env(r, world), str, 0.2, 2.0, store=stores[r], on_lost=on_lost(r)) for r in range(world)]
    try:
        watches[2].stop()  # finished: rank 1 watches rank 3 from now on
        watches[3].stop()  # and then rank 4
        time.sleep(5.0)  # longer than the patience and the start-up grace: a finished rank is never taken for lost
        assert knew == {}
        stores[4].silent.set()  # rank 4's link goes down
        deadline = time.monotonic() + 6.0
        while len(knew) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        named = {r: knew[r][0] for r in knew}
        assert named == {0: 4, 1: 4, 5: 4, 4: 0}  # rank 1, past 2 and 3, found it; rank 4 cannot reach rank 0's store
        left = [knew[r][1] for r in (0, 1, 5)]
        assert max(left) - min(left) < 0.5  # they leave together: none ends another's collective first
    finally:
        for watch in watches:
            watch.stopped.set()


def test_a_lost_peer_s_line_carries_the_library_s_message_whole_and_what_is_kept():
    text = (
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:538] Connection closed by peer [10.77.0.12]:52879. This is "
        "typically caused by a remote worker crashing. Check the logs of the remote worker before reporting an error."
        "\nException raised from ..."
    )
    line = str(lost_peer_error(RuntimeError(text), lambda: "the shards finished so far in out are kept"))
    assert "(Connection closed by peer [10.77.0.12]:52879. This is typically caused by a remote worker" in line
    assert "Check the logs of the remote worker before reporting an error.)" in line
    assert "pair.cc" not in line and "Exception raised" not in line
    assert line.endswith("see its log; the shards finished so far in out are kept")
    assert lost_peer_error(RuntimeError("shape mismatch"), lambda: 1 / 0) is None  # another error: no hint asked for


WATCHED_RANK_1 = """
import torch
from disco_dist.bench.peer_watch_load import CountedStore, Env
from disco_dist.cluster import distributed
from disco_dist.cluster.peer_watch import PeerWatch
master = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
distributed.HOSTS[:] = ["node-a", "node-b"]
store = CountedStore(master.port, 1.0)
watch = PeerWatch(Env(1, 2), lambda: "the last complete checkpoint is ck", 0.2, 1.5, store=store)
store.silent.set()  # rank 0's node (and the store it holds) stops answering
import time; time.sleep(30)
"""


def test_a_rank_that_loses_rank_0_s_store_says_so_in_one_line_kept_in_the_error_log(tmp_path):
    """Rank 0's node holds the rendezvous store: when it stops answering, rank 1 leaves with one line naming rank 0,
    its host and the store, exit 75 (nothing to fix), and the line is also appended, with the time, host and exit
    code, to DISCO_ERROR_LOG (the file the
    SLURM batch scripts keep beside the job's log, which survives the first node's srun)."""
    import os
    import subprocess
    import sys

    errors = tmp_path / "slurm-7.errors"
    env = {**os.environ, "DISCO_ERROR_LOG": str(errors)}
    run = subprocess.run([sys.executable, "-c", WATCHED_RANK_1], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 75, run.stderr[-2000:]  # EXIT_RETRY: nothing to fix, the same command goes on
    line = "error: rank 1: lost rank 0 on node-a: the rendezvous store it holds has not answered for 2 s"
    assert run.stderr.startswith(line) and "; the last complete checkpoint is ck once" in run.stderr, run.stderr
    kept = errors.read_text().splitlines()
    assert len(kept) == 1 and kept[0].split(" ", 4)[4] == run.stderr.strip() and " exit 75: " in kept[0], kept
    assert kept[0].split()[1] == os.uname().nodename


def test_a_rank_whose_stderr_is_gone_still_keeps_its_line_in_the_error_log(tmp_path):
    """When the job's first node is lost, the other ranks' stderr went through the srun that ran there: nobody may read
    it any more. The line is kept in DISCO_ERROR_LOG first, and a broken pipe on stderr costs only the printed copy:
    the rank still exits with its code (75: nothing to fix)."""
    import os
    import subprocess
    import sys

    errors = tmp_path / "slurm-7.errors"
    reader, writer = os.pipe()
    os.close(reader)  # a stderr nobody reads: writing to it fails with a broken pipe
    try:
        run = subprocess.run(
            [sys.executable, "-c", WATCHED_RANK_1],
            stdout=subprocess.DEVNULL,
            stderr=writer,
            env={**os.environ, "DISCO_ERROR_LOG": str(errors)},
            timeout=60,
        )
    finally:
        os.close(writer)
    assert run.returncode == 75
    kept = errors.read_text().splitlines()
    assert len(kept) == 1 and " exit 75: error: rank 1: lost rank 0 on node-a: the rendezvous store" in kept[0], kept
