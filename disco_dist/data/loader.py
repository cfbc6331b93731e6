"""Deterministic, resumable batches for every rank: streamed shards (stage 1) and NLI triplets (stage 2).

Both loaders answer two questions the training loop asks: how many batches this epoch has
(`batches_per_epoch(epoch)`, the same on every rank) and which batches they are from a position on
(`batches(epoch, start)`). The loop's (epoch, batch) position is the loader state a checkpoint keeps:
rebuilding a loader and asking for `batches(epoch, start)` yields exactly what an uninterrupted run saw.

Stage-1 rule, per epoch: the shard list is shuffled with (seed, epoch), the same on every rank; rank r
reads shards r, r+W, r+2W, ... of it, through a shuffle buffer seeded with (seed, epoch, rank), then
groups `length_bucket` batches' worth of sentences by length (less padding) and shuffles the order of
those batches with (seed, epoch), the same order on every rank: at each step the ranks' batches come from the
same length quantile of their groups, so no rank waits long for another's longer batch at the all-reduce
(see docs/benchmarks.md, "Where a step's time goes"). Every rank yields N = floor(min over ranks of its
sentence count / batch size) batches; each rank's remaining sentences are not seen in that epoch (a different
remainder each epoch).
With `num_workers` > 0, worker w of a rank tokenises batches start+w, start+w+K, ... of the same
stream (reading text is cheap, tokenising is not), and the DataLoader returns them in order.
"""

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..core.errors import UserError
from ..core.iters import chunks
from .shards import ShardIndex, iter_shard_samples


def _rng(*parts) -> random.Random:
    return random.Random(" ".join(str(p) for p in parts))  # str seeds hash deterministically across runs


class ShardBatches:
    def __init__(
        self,
        index: ShardIndex,
        batch_size: int,
        rank: int,
        world_size: int,
        collate,
        seed: int = 0,
        shuffle_buffer: int = 10_000,
        length_bucket: int = 16,
        num_workers: int = 0,
        with_ids: bool = False,
    ):
        if len(index.shards) < world_size:
            raise UserError(
                f"{index.folder} has {len(index.shards)} shards for {world_size} ranks: every rank needs "
                f"its own shards; re-make them with --shard-size at most {index.total // world_size}"
            )
        self.index, self.batch_size, self.rank, self.world_size = index, batch_size, rank, world_size
        self.collate, self.seed, self.shuffle_buffer = collate, seed, shuffle_buffer
        self.length_bucket, self.num_workers = max(1, length_bucket), num_workers
        self.with_ids = with_ids  # the shards' stored token ids go to `collate(texts, teacher, ids)`
        if self.batches_per_epoch(0) == 0:
            raise UserError(
                f"{index.folder}: {index.total} sentences over {world_size} ranks give no full batch of "
                f"{batch_size}; lower --batch-size or use more sentences"
            )

    def shards_of(self, epoch: int, rank: int) -> list:
        order = list(range(len(self.index.shards)))
        _rng("shards", self.seed, epoch).shuffle(order)
        return order[rank :: self.world_size]

    def batches_per_epoch(self, epoch: int) -> int:
        counts = self.index.counts
        return min(sum(counts[i] for i in self.shards_of(epoch, r)) for r in range(self.world_size)) // self.batch_size

    def raw_batches(self, epoch: int):
        """This rank's epoch as lists of (key, text, teacher) samples (with the stored ids last, with `with_ids`),
        before tokenisation (cheap)."""
        rng = _rng("samples", self.seed, epoch, self.rank)
        order = _rng("batch order", self.seed, epoch)  # the same on every rank: equal-length steps
        group = self.batch_size * self.length_bucket
        produced, limit = 0, self.batches_per_epoch(epoch)
        shards = self.shards_of(epoch, self.rank)
        samples = iter_shard_samples(self.index, shards, with_keys=True, with_ids=self.with_ids)
        for chunk in chunks(_shuffled(samples, self.shuffle_buffer, rng), group):
            if self.length_bucket > 1:
                chunk.sort(key=lambda sample: len(sample[1]))
            batches = [
                chunk[i : i + self.batch_size] for i in range(0, len(chunk) - self.batch_size + 1, self.batch_size)
            ]
            order.shuffle(batches)
            for batch in batches:
                if produced == limit:
                    return
                yield batch
                produced += 1

    def batches(self, epoch: int, start: int = 0):
        dataset = _CollatedBatches(self, epoch, start)
        if self.num_workers == 0:
            return iter(dataset)
        # batch_size=None: the dataset already yields batches; in-order round-robin over workers. Every worker reads
        # the rank's whole stream (K workers read each shard K times: cheap from disk, K-fold traffic from a server)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False)
        return _raising_user_errors(iter(loader))


class _CollatedBatches(IterableDataset):
    def __init__(self, loader: ShardBatches, epoch: int, start: int):
        self.loader, self.epoch, self.start = loader, epoch, start

    def __iter__(self):
        info = get_worker_info()
        if info is None:
            yield from self._batches(0, 1)
            return
        try:
            yield from self._batches(info.id, info.num_workers)
        except UserError as err:  # to the main process as data: torch would wrap it in a worker's traceback
            yield {WORKER_ERROR: (type(err), str(err))}

    def _batches(self, worker: int, workers: int):
        for number, batch in enumerate(self.loader.raw_batches(self.epoch)):
            if number >= self.start and (number - self.start) % workers == worker:
                texts = [sample[1] for sample in batch]
                teacher = (
                    None
                    if batch[0][2] is None
                    else torch.from_numpy(np.stack([sample[2] for sample in batch]).astype(np.float32))
                )
                ids = {"ids": [sample[3] for sample in batch]} if self.loader.with_ids else {}
                yield {**self.loader.collate(texts, teacher, **ids), "keys": [sample[0] for sample in batch]}


WORKER_ERROR = "__user_error__"


def _raising_user_errors(batches):
    """Batches from DataLoader workers; a worker's UserError (a shard that fails its check) raised here, whole."""
    for batch in batches:
        if WORKER_ERROR in batch:
            kind, message = batch[WORKER_ERROR]
            raise kind(message)
        yield batch


def _shuffled(samples, buffer_size: int, rng: random.Random):
    """A streaming shuffle: keep `buffer_size` samples, emit a random one as each new one arrives."""
    buffer = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = rng.randrange(buffer_size)
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class TripletBatches:
    """NLI triplets held in memory: per epoch a seeded permutation; rank r takes every W-th batch's slice.

    Every rank yields floor(triplets / (W * batch size)) batches; the rest are not seen that epoch."""

    def __init__(self, triplets: tuple, batch_size: int, rank: int, world_size: int, collate, seed: int = 0):
        self.anchors, self.positives, self.negatives = triplets
        self.batch_size, self.rank, self.world_size, self.collate, self.seed = (
            batch_size,
            rank,
            world_size,
            collate,
            seed,
        )
        if self.batches_per_epoch(0) == 0:
            raise UserError(
                f"{len(self.anchors)} triplets over {world_size} ranks give no full batch of {batch_size}; "
                "lower --batch-size"
            )

    def batches_per_epoch(self, epoch: int) -> int:
        return len(self.anchors) // (self.world_size * self.batch_size)

    def batches(self, epoch: int, start: int = 0):
        order = list(range(len(self.anchors)))
        _rng("triplets", self.seed, epoch).shuffle(order)
        global_batch = self.world_size * self.batch_size
        for number in range(start, self.batches_per_epoch(epoch)):
            first = number * global_batch + self.rank * self.batch_size
            index = order[first : first + self.batch_size]
            batch = self.collate(
                [self.anchors[i] for i in index], [self.positives[i] for i in index], [self.negatives[i] for i in index]
            )
            yield {**batch, "keys": [str(i) for i in index]}  # triplets are named by their row
