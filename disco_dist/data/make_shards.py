"""A corpus -> shuffled WebDataset shards + index, in bounded memory whatever the corpus' size.

Pass 1 streams the corpus (`data/corpus.py`: formats, filters, deduplication) into a temporary file of the kept
sentences. If they are at most `shuffle_rows`, they are shuffled in memory with `random.Random(seed)`; otherwise
each goes to one of K temporary buckets drawn at random (seeded), and each bucket, at most about `shuffle_rows`
sentences, is shuffled in memory and written out in turn: together a uniform random order. Memory: the seen-set's
8 bytes per kept sentence (`data/dedupe.py`) plus at most about `shuffle_rows` sentences (beyond MAX_BUCKETS x
shuffle_rows / 2 sentences, the buckets grow past it). The temporary files live
in `<out>/.make_shards-tmp/` and are removed at the end.
"""

import math
import random
import shutil
import struct
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.iters import chunks
from ..core.progress import Progress
from .corpus import CorpusStats, corpus_files, ignored_files, read_corpus, source_sha256
from .shards import INDEX, ShardFolderWriter, ShardIndex

TMP = ".make_shards-tmp"
LENGTH = struct.Struct("<I")
MAX_BUCKETS = 512


def make_shards(
    corpus,
    out,
    shard_size=1000,
    seed=0,
    limit=None,
    overwrite=False,
    text_field="text",
    min_chars=0,
    max_chars=None,
    bad_rows="stop",
    shuffle_rows=1_000_000,
    log=print,
) -> ShardIndex:
    """Corpus -> shuffled shards + index. Deterministic for a given corpus, filters, limit, seed and shuffle_rows
    (a corpus that fits in `shuffle_rows` gives the same shards whatever `shuffle_rows`)."""
    files = corpus_files(corpus)  # a missing path or empty folder: one line before any output is touched
    out = Path(out)
    if shard_size < 1 or shuffle_rows < 1:
        raise UserError(f"--shard-size and --shuffle-rows must be at least 1, got {shard_size} and {shuffle_rows}")
    if (out / INDEX).exists() and not overwrite:
        raise UserError(f"{out} already holds shards; choose a new --out folder (or --overwrite)")
    ignored = ignored_files(corpus)
    if ignored:
        names = ", ".join(str(p.relative_to(corpus)) for p in ignored[:5]) + (", ..." if len(ignored) > 5 else "")
        log(f"make_shards: {len(ignored)} file(s) of {corpus} are not corpus files and are not read ({names})")
    tmp, created = out / TMP, not out.exists()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        stats = CorpusStats()
        reading = Progress("make_shards: reading", "sentences", total=limit, log=log)
        with open(tmp / "kept", "wb") as spill:
            for sentence in read_corpus(corpus, stats, limit, text_field, min_chars, max_chars, bad_rows, log):
                _put(spill, sentence)
                reading.update()
        reading.close()
        # only now, with the whole corpus read, are shards already in `out` replaced (--overwrite)
        writer = ShardFolderWriter(out, shard_size, overwrite)
        writing = Progress("make_shards: writing", "sentences", total=stats.kept, log=log)
        for sentence in _shuffled(tmp / "kept", stats.kept, seed, shuffle_rows, tmp):
            writer.write(sentence)
            writing.update()
        writing.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(out.iterdir()):  # a corpus that failed before any shard: leave no empty folder
            out.rmdir()
    index = writer.finish(
        source=str(Path(corpus).resolve()),
        source_format=sorted({f.format for f in files}),
        source_sha256=source_sha256(corpus),
        text_field=text_field if any(f.format != "text" for f in files) else None,
        seed=seed,
        limit=limit,
        min_chars=min_chars,
        max_chars=max_chars,
        rows_read=stats.rows,
        dropped=stats.dropped(),
        teacher=None,
    )
    dropped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in stats.dropped().items() if n)
    log(
        f"wrote {index.total} sentences in {len(index.shards)} shards to {out} "
        f"(read {stats.rows} rows; dropped {dropped or 'none'})"
    )
    return index


def _put(file, sentence: str) -> None:
    data = sentence.encode("utf-8")
    file.write(LENGTH.pack(len(data)))
    file.write(data)


def _records(path: Path):
    with open(path, "rb") as f:
        while header := f.read(LENGTH.size):
            yield f.read(LENGTH.unpack(header)[0]).decode("utf-8")


def _shuffled(kept: Path, count: int, seed: int, shuffle_rows: int, tmp: Path):
    """The kept sentences in a seeded uniform random order, holding at most about `shuffle_rows` at once."""
    if count <= shuffle_rows:
        sentences = list(_records(kept))
        random.Random(seed).shuffle(sentences)
        yield from sentences
        return
    # ~shuffle_rows / 2 each, so that a bucket rarely exceeds shuffle_rows; at most MAX_BUCKETS open files
    buckets = min(MAX_BUCKETS, math.ceil(2 * count / shuffle_rows))
    rng = np.random.default_rng(seed)
    files = [open(tmp / f"bucket-{b:05d}", "wb") for b in range(buckets)]
    try:
        for chunk in chunks(_records(kept), 65536):
            for sentence, bucket in zip(chunk, rng.integers(buckets, size=len(chunk))):
                _put(files[bucket], sentence)
    finally:
        for file in files:
            file.close()
    kept.unlink()
    for b in range(buckets):
        sentences = list(_records(tmp / f"bucket-{b:05d}"))
        random.Random(f"{seed} {b}").shuffle(sentences)
        (tmp / f"bucket-{b:05d}").unlink()
        yield from sentences
