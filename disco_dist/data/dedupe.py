"""Which sentences were seen before, in bounded memory: 64-bit hashes in sorted runs (a log-structured merge).

A set of the sentences would hold every sentence's text; here a sentence costs 8 bytes (its blake2b-64 hash) held
in sorted numpy runs whose sizes at least halve from one to the next, so a lookup is a binary search in each of
~log2(rows / batch) runs, and a merge briefly holds its two runs and the merged one: at worst 16 bytes a row
(measured at 100M rows: 751 MiB held, 1,097 MiB peak: `python -m disco_dist.data.dedupe 100000000`).
Two different sentences share a hash with probability ~rows^2 / 2^65 (2.7e-4 at 100M rows): then the second is
dropped as a duplicate. The hash is keyed by nothing: the same corpus always drops the same rows.
"""

import hashlib

import numpy as np


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class SeenHashes:
    def __init__(self):
        self.runs = []  # sorted, disjoint uint64 arrays, each at least twice the size of the next

    def __len__(self) -> int:
        return sum(len(run) for run in self.runs)

    @property
    def nbytes(self) -> int:
        return sum(run.nbytes for run in self.runs)

    def first_seen(self, texts: list) -> np.ndarray:
        """For each text, whether it occurs neither earlier in `texts` nor in any earlier call; remembers them."""
        return self.first_seen_hashes(np.fromiter((hash64(t) for t in texts), dtype=np.uint64, count=len(texts)))

    def first_seen_hashes(self, hashes: np.ndarray) -> np.ndarray:
        unique, first = np.unique(hashes, return_index=True)
        new = np.ones(len(unique), dtype=bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, unique), len(run) - 1)
            new &= run[at] != unique
        keep = np.zeros(len(hashes), dtype=bool)
        keep[first[new]] = True
        if new.any():
            self._add(unique[new])
        return keep

    def _add(self, sorted_hashes: np.ndarray) -> None:
        self.runs.append(sorted_hashes)
        while len(self.runs) > 1 and 2 * len(self.runs[-1]) > len(self.runs[-2]):
            last = self.runs.pop()
            merged = np.concatenate([self.runs.pop(), last])
            merged.sort()
            self.runs.append(merged)


def main(argv=None) -> None:
    """`python -m disco_dist.data.dedupe ROWS`: the seen-set's memory and time over ROWS random 64-bit hashes,
    fed as make_shards feeds it (8,192 a call; a few repeats per call, which must be dropped)."""
    import argparse
    import resource
    import time

    parser = argparse.ArgumentParser(prog="python -m disco_dist.data.dedupe")
    parser.add_argument("rows", type=int)
    rows = parser.parse_args(argv).rows
    rng, seen, kept, start = np.random.default_rng(0), SeenHashes(), 0, time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for first in range(0, rows, 8192):
        hashes = rng.integers(0, 2**64 - 1, size=min(8192, rows - first), dtype=np.uint64, endpoint=True)
        hashes[: len(hashes) // 64] = hashes[-1]  # repeats within the call
        kept += int(seen.first_seen_hashes(hashes).sum())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{rows:,} rows, {kept:,} kept: the seen-set holds {seen.nbytes / 2**20:,.0f} MiB "
        f"({seen.nbytes / len(seen):.1f} bytes a kept row) in {len(seen.runs)} runs; process peak RSS "
        f"{peak:,.0f} MiB ({before:,.0f} before); {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
