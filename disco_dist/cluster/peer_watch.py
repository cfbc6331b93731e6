"""Heartbeats through the rendezvous store: a rank whose node went silent (network down, frozen) ends the run a few
beats after `DISCO_PEER_TIMEOUT` seconds (default 20) with one line naming it, not at the collective's own 600 s
time-out.

Each rank watches one other: the next rank round the ring that has not finished. Every `interval` seconds a rank
adds 1 to its own counter, reads its neighbour's, and looks whether a loss has been published: three store calls a
rank, 3W against rank 0's store a beat (every rank reading every other's counter, as before, was 2W^2 - W: about
524,000 calls every 2 s at 512 ranks). A neighbour whose counter has not moved for `patience` seconds is lost; its
watcher publishes the loss (`disco/lost`; the first published wins), and every rank leaves at the moment the record
sets, two and a half beats on, with the same line naming the lost rank and its host (one leaving first would end the
others' collectives, and they would name it instead). A ring always has a live rank watching a silent one, however
many ranks a node held. A rank that cannot reach the store (rank 0's process holds it) has lost rank 0. A rank that
finished marks its counter done, and its watcher moves on to the next rank, so a slow final save is never taken for
a loss. `python -m disco_dist.bench.peer_watch_load` measures the store's load and the detection time at many ranks.
"""

import datetime
import os
import threading
import time
from collections.abc import Callable

import torch

from ..core.errors import EXIT_RETRY, say_error
from . import distributed

DONE = 1 << 40  # a finished rank's counter jumps past this
LOST_KEY = "disco/lost"  # "RANK SECONDS" of the rank its watcher found silent


def beat_key(rank: int) -> str:
    return f"disco/beat/{rank}"


class PeerWatch:
    """Watches the next unfinished rank round the ring through `store` (default: a client of the rendezvous store)
    from two threads: one beats and reads, one judges, so that a store call stuck on a dead link cannot hide a loss.
    `on_lost(rank, seconds)` ends the run (default: print the one line, ending with `hint()`, what is kept and how to
    go on, and exit the process). Nothing happens with one rank."""

    def __init__(
        self,
        env,
        hint: Callable[[], str],
        interval: float = 2.0,
        patience: float | None = None,
        store=None,
        on_lost: Callable[[int, float], None] | None = None,
    ):
        self.rank, self.world, self.hint, self.interval = env.rank, env.world_size, hint, interval
        self.patience = patience or float(os.environ.get("DISCO_PEER_TIMEOUT", "20"))
        self.on_lost = on_lost or self._exit
        self.last_ok = time.monotonic()
        # (rank or None, its counter, unchanged since): the first neighbour gets one patience more to connect
        self.watching = (self._after(self.rank), 0, time.monotonic() + self.patience)
        self.published = None  # (rank, seconds, leave at): the loss the first watcher to find one published
        self.stopped = threading.Event()
        self.store_silent = False  # the loss is the store's own silence, not a neighbour's counter
        self.store = None
        if self.world > 1:
            self.store = store or torch.distributed.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=datetime.timedelta(seconds=self.patience),
                wait_for_workers=False,
            )
            threading.Thread(target=self._beat, daemon=True).start()
            threading.Thread(target=self._judge, daemon=True).start()

    def _after(self, rank: int) -> int | None:
        following = (rank + 1) % self.world
        return None if following == self.rank else following

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.store.add(beat_key(self.rank), 1)
                if self.published is None and self.store.check([LOST_KEY]):
                    self.published = _parse(self.store.get(LOST_KEY))
                target, count, since = self.watching
                now = time.monotonic()
                while target is not None:
                    latest = self.store.add(beat_key(target), 0)
                    if latest < DONE:
                        if latest != count:
                            count, since = latest, now
                        break
                    target, count, since = self._after(target), 0, now  # finished: watch the next one
                self.watching = (target, count, since)
                self.last_ok = now
            except (RuntimeError, OSError):  # the store (rank 0's process) does not answer: the judge will see it
                pass

    def _judge(self) -> None:
        while not self.stopped.wait(self.interval / 4):
            now = time.monotonic()
            target, count, since = self.watching
            if self.published is None and now - self.last_ok > self.patience:
                lost = (0, now - self.last_ok, time.time())  # no answer from the store, which rank 0 holds
                self.store_silent = True
            elif self.published is None and target is not None and self.last_ok - since > self.patience:
                # silent as seen by this rank's own reads that succeeded: a rank that cannot read blames no neighbour
                lost = self._publish(target, count, self.last_ok - since)
                if lost is None:  # it beat after all, or finished, or the store stopped answering
                    continue
            elif self.published is not None:
                lost = self.published
            else:
                continue
            rank, seconds, leave_at = lost
            # every rank leaves at the same moment: one leaving first would end the others' collectives, and they
            # would name it instead of the lost rank
            if not self.stopped.wait(min(3 * self.interval, max(0.0, leave_at - time.time()))):
                self.on_lost(rank, seconds)
            return

    def _publish(self, target: int, count: int, seconds: float) -> tuple | None:
        """Tell every rank that `target` is lost (the first loss published wins), unless it beat or finished after
        all; all leave once each had two beats to read it (at once when no other rank is left to read it)."""
        try:
            if self.store.add(beat_key(target), 0) != count:
                self.watching = (target, count, self.last_ok - self.patience / 2)  # the beat thread catches up
                return None
            others = self.world > 2
            record = f"{target} {seconds:.0f} {time.time() + (2.5 * self.interval if others else 0):.3f}"
            return _parse(self.store.compare_set(LOST_KEY, "", record))
        except (RuntimeError, OSError):  # the store stopped answering: the next look decides
            return None

    def _exit(self, rank: int, seconds: float) -> None:
        if rank == self.rank:
            what = f"the other ranks had no heartbeat from this rank for {seconds:.0f} s (its node or network stalled)"
        elif self.store_silent:
            host = distributed.HOSTS[0] if distributed.HOSTS else "its node"
            what = f"lost rank 0 on {host}: the rendezvous store it holds has not answered for {seconds:.0f} s (its "
            what += "node crashed, froze or lost its network, or this node lost its own)"
        else:
            host = distributed.HOSTS[rank] if rank < len(distributed.HOSTS) else "its node"
            what = f"lost rank {rank} on {host}: no heartbeat for {seconds:.0f} s (its node crashed, froze or lost "
            what += "its network)"
        say_error(f"error: rank {self.rank}: {what}; {self.hint()} once the node is back", EXIT_RETRY)
        os._exit(EXIT_RETRY)  # a collective may hold the main thread; srun --kill-on-bad-exit ends the other tasks

    def stop(self) -> None:
        """This rank is done (finished or leaving on purpose): its watcher moves on to the next rank."""
        if self.store is not None and not self.stopped.is_set():
            self.stopped.set()
            try:
                self.store.add(beat_key(self.rank), DONE)
            except (RuntimeError, OSError):
                pass

    def close(self) -> None:
        """Every rank is through the last barrier: stop without a word to the store (rank 0's, which may be gone)."""
        self.stopped.set()


def _parse(record: bytes) -> tuple:
    rank, seconds, leave_at = record.decode().split()
    return int(rank), float(seconds), float(leave_at)
