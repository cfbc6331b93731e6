"""How much a run's heartbeats load the rendezvous store, and how fast a silent rank is found, at many ranks.

W ranks' `PeerWatch`es run as threads in this process, each with its own client connection speaking the real
TCPStore protocol to one store (as rank 0's process holds it in a run). After a steady window one rank goes silent:
its store calls hang until the store's time-out, as on a dead link. The table gives the store calls a second, the
calls' latency, and the time from the silence until the first rank and until every other rank knew, and whether
all of them named the silent rank.

    python -m disco_dist.bench.peer_watch_load --world 8 64 512    # the defaults: beats every 2 s, 20 s patience
    python -m disco_dist.bench.peer_watch_load --world 64 --interval 0.5 --patience 5 --out runs/peer_watch.json
"""

import argparse
import datetime
import resource
import statistics
import threading
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import torch

from ..cluster.peer_watch import PeerWatch
from ..core.files import write_json_atomic

Env = namedtuple("Env", "rank world_size")


class CountedStore:
    """A store client that counts and times its calls, and can go silent: then each call hangs for the store's
    time-out and fails, as a call over a link that went down."""

    def __init__(self, port: int, timeout: float):
        # connecting gets a minute: here about every 25th TCPStore connection stalls 5 s before it is accepted
        self.store = torch.distributed.TCPStore(
            "127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60), wait_for_workers=False
        )
        self.store.set_timeout(datetime.timedelta(seconds=timeout))
        self.timeout, self.silent, self.lock = timeout, threading.Event(), threading.Lock()
        self.calls, self.latencies = 0, []

    def _call(self, name: str, *args):
        if self.silent.is_set():
            time.sleep(self.timeout)
            raise TimeoutError("silent")
        start = time.perf_counter()
        result = getattr(self.store, name)(*args)
        with self.lock:
            self.calls += 1
            self.latencies.append(time.perf_counter() - start)
        return result

    def add(self, key, amount):
        return self._call("add", key, amount)

    def check(self, keys):
        return self._call("check", keys)

    def get(self, key):
        return self._call("get", key)

    def compare_set(self, key, expected, desired):
        return self._call("compare_set", key, expected, desired)


def recorder(knew: dict):
    """on_lost for rank r: knew[r] = (the rank it was told is lost, when), the first time only."""
    lock = threading.Lock()

    def for_rank(rank):
        def record(lost, _seconds):
            with lock:
                knew.setdefault(rank, (lost, time.monotonic()))

        return record

    return for_rank


def measure(world: int, interval: float, patience: float, steady: float) -> dict:
    """One row: `world` watchers against one store, a steady window, then one rank silent until all others know."""
    master = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with ThreadPoolExecutor(32) as pool:  # connections in parallel: their stalls overlap
        stores = list(pool.map(lambda _: CountedStore(master.port, patience), range(world)))
    knew = {}
    on_lost = recorder(knew)
    watches = [
        PeerWatch(Env(r, world), str, interval, patience, store=stores[r], on_lost=on_lost(r)) for r in range(world)
    ]
    time.sleep(2 * interval)  # every thread started and beating
    calls_before = sum(s.calls for s in stores)
    for s in stores:
        s.latencies.clear()
    start = time.monotonic()
    time.sleep(steady)
    calls = sum(s.calls for s in stores) - calls_before
    window = time.monotonic() - start
    latencies = sorted(x for s in stores for x in s.latencies)
    silent = world // 2 + 1
    stores[silent].silent.set()
    silenced = time.monotonic()
    others = [r for r in range(world) if r != silent]
    while len([r for r in others if r in knew]) < len(others) and time.monotonic() - silenced < 3 * patience:
        time.sleep(0.05)
    for watch in watches:
        watch.stopped.set()
    found = sorted(knew[r][1] - silenced for r in others if r in knew)
    return {
        "world": world,
        "interval_s": interval,
        "patience_s": patience,
        "store_calls_per_s": round(calls / window, 1),
        "calls_per_rank_per_beat": round(calls / window * interval / world, 2),
        "all_pairs_calls_per_s": round(world * (2 * world - 1) / interval, 1),
        "latency_ms_median": round(1e3 * statistics.median(latencies), 3),
        "latency_ms_p99": round(1e3 * latencies[int(0.99 * (len(latencies) - 1))], 3),
        "silent_rank": silent,
        "first_knew_s": round(found[0], 2) if found else None,
        "all_knew_s": round(found[-1], 2) if len(found) == len(others) else None,
        "named_right": sum(knew[r][0] == silent for r in others if r in knew),
        "others": len(others),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between beats (a run's: 2)")
    parser.add_argument(
        "--patience", type=float, default=20.0, help="silence that counts as lost (DISCO_PEER_TIMEOUT: 20)"
    )
    parser.add_argument("--steady", type=float, default=10.0, help="seconds of steady beating measured")
    parser.add_argument("--out", help="write the rows here as JSON")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * max(args.world) + 256)), hard))
    rows = [measure(w, args.interval, args.patience, args.steady) for w in args.world]
    print(
        f"{'ranks':>6} {'store calls/s':>14} {'a rank a beat':>14} {'all-pairs would':>16} {'latency ms p50/p99':>19} "
        f"{'first knew s':>13} {'all knew s':>11} {'named right':>12}"
    )
    for r in rows:
        print(
            f"{r['world']:>6} {r['store_calls_per_s']:>14,.1f} {r['calls_per_rank_per_beat']:>14} "
            f"{r['all_pairs_calls_per_s']:>16,.1f} {r['latency_ms_median']:>9}/{r['latency_ms_p99']:<9} "
            f"{r['first_knew_s']!s:>13} {r['all_knew_s']!s:>11} {r['named_right']:>6}/{r['others']:<5}"
        )
    if args.out:
        write_json_atomic(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
