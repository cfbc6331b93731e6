"""The streaming loader: equal batch counts per rank, exact resume, workers, clear errors."""

import pytest

from disco_dist.core.errors import UserError
from disco_dist.data.loader import ShardBatches, TripletBatches
from disco_dist.data.shards import ShardFile, ShardFolderWriter, shard_name, write_index


def texts_only(texts, teacher):
    return {"texts": texts}


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """7 shards of different sizes (301 sentences of different lengths)."""
    folder = tmp_path_factory.mktemp("uneven")
    sizes = [80, 13, 55, 41, 7, 60, 45]
    entries, n = [], 0
    for number, size in enumerate(sizes):
        shard = ShardFile(folder / shard_name(number))
        for _ in range(size):
            shard.write(f"{n:09d}", "word " * (n % 17) + f"sentence {n}")
            n += 1
        entries.append(shard.close())
    return write_index(folder, n, entries)


def loader(index, rank, world=2, **kw):
    options = dict(
        batch_size=8, rank=rank, world_size=world, collate=texts_only, seed=5, shuffle_buffer=50, length_bucket=4
    )
    options.update(kw)
    return ShardBatches(index, **options)


def test_every_rank_has_the_same_number_of_batches(uneven_shards):
    for epoch in range(4):
        per_rank = [list(loader(uneven_shards, r).batches(epoch)) for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1]) == loader(uneven_shards, 0).batches_per_epoch(epoch) > 0
        seen = [t for batches in per_rank for batch in batches for t in batch["texts"]]
        assert len(seen) == len(set(seen))  # no sentence twice within an epoch
        keys = [k for batches in per_rank for batch in batches for k in batch["keys"]]
        assert keys == [f"{int(t.split()[-1]):09d}" for t in seen]  # each batch names its samples
    three = [loader(uneven_shards, r, world=3).batches_per_epoch(1) for r in range(3)]
    assert len(set(three)) == 1


def test_the_ranks_batches_at_each_step_come_from_the_same_length_quantile(tmp_path):
    """Batch order is shared by the ranks: at every step the ranks' batches are the k-th shortest of their
    groups, so none waits long for another's longer batch at the gradient all-reduce."""
    import random

    writer = ShardFolderWriter(tmp_path, shard_size=50)
    lengths = random.Random(0).sample(range(1, 2000), 800)  # every sentence a different length
    for n, length in enumerate(lengths):
        writer.write("x" * length + f" {n}")
    index = writer.finish()
    group = 4  # length_bucket: batches per sorted group
    ranks = [list(loader(index, r).batches(0)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) >= 3 * group
    orders = []
    for start in range(0, len(ranks[0]) - group + 1, group):
        quantiles = []
        for batches in ranks:
            longest = [max(len(t) for t in batch["texts"]) for batch in batches[start : start + group]]
            quantiles.append(sorted(range(group), key=longest.__getitem__))
        assert quantiles[0] == quantiles[1], start
        orders.append(quantiles[0])
    assert len({tuple(o) for o in orders}) > 1  # still shuffled: not shortest first, nor one fixed order


def test_epochs_differ_and_are_reproducible(uneven_shards):
    a = list(loader(uneven_shards, 0).batches(0))
    assert a == list(loader(uneven_shards, 0).batches(0))
    assert a != list(loader(uneven_shards, 0).batches(1))


def test_resume_mid_epoch_gives_the_next_batches(tmp_path):
    writer = ShardFolderWriter(tmp_path, shard_size=40)
    for n in range(800):
        writer.write(f"{'x' * (n % 23)} {n}")
    index = writer.finish()
    first = loader(index, 1, batch_size=4)
    stream = first.batches(epoch=2)
    consumed = [next(stream) for _ in range(40)]
    expected_next = [next(stream) for _ in range(8)]
    position = {"epoch": 2, "batch": len(consumed)}  # what a checkpoint keeps
    rebuilt = loader(index, 1, batch_size=4).batches(position["epoch"], position["batch"])
    assert [next(rebuilt) for _ in range(8)] == expected_next


def test_workers_yield_the_same_batches_in_the_same_order(uneven_shards):
    plain = list(loader(uneven_shards, 1).batches(3, start=2))
    with_workers = list(loader(uneven_shards, 1, num_workers=2).batches(3, start=2))
    assert with_workers == plain


def test_too_few_shards_is_a_clear_error(uneven_shards):
    with pytest.raises(UserError, match="7 shards for 8 ranks"):
        loader(uneven_shards, 0, world=8)
    with pytest.raises(UserError, match="no full batch"):
        loader(uneven_shards, 0, batch_size=1000)


def test_triplet_batches_split_over_ranks_and_resume():
    triplets = tuple([f"{c}{i}" for i in range(50)] for c in "apn")
    ranks = [TripletBatches(triplets, 4, r, 2, lambda a, p, n: {"columns": (a, p, n)}, seed=1) for r in range(2)]
    assert [r.batches_per_epoch(0) for r in ranks] == [6, 6]
    batches = [list(r.batches(0)) for r in ranks]
    anchors = [a for rank in batches for batch in rank for a in batch["columns"][0]]
    assert len(anchors) == len(set(anchors)) == 48
    assert [k for rank in batches for batch in rank for k in batch["keys"]] == [a[1:] for a in anchors]
    assert list(ranks[0].batches(0, start=4)) == batches[0][4:]
    assert all(p == "p" + a[1:] for rank in batches for batch in rank for a, p in zip(*batch["columns"][:2]))
