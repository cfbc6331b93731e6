"""Plain-text corpora (one sentence per line, optionally gzip) for distillation."""

import gzip
from dataclasses import dataclass

from . import require_file


@dataclass
class CorpusStats:
    lines: int = 0
    empty: int = 0
    undecodable: int = 0
    duplicates: int = 0
    kept: int = 0


def read_corpus(path, stats: CorpusStats | None = None, limit: int | None = None, dedupe: bool = True):
    """Yield the corpus' sentences in file order: stripped, non-empty, valid UTF-8, first occurrence only.

    What is dropped is counted in `stats`. `limit` stops after that many kept sentences (a prefix of a
    shuffled corpus is a uniform sample). Text is never truncated: tokenisation decides the length.
    """
    stats = stats if stats is not None else CorpusStats()
    path = require_file(path)
    opener = gzip.open if str(path).endswith(".gz") else open
    seen = set()
    with opener(path, "rb") as f:
        for raw in f:
            if limit is not None and stats.kept >= limit:
                return
            stats.lines += 1
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                stats.undecodable += 1
                continue
            if not text:
                stats.empty += 1
                continue
            if dedupe:
                if text in seen:
                    stats.duplicates += 1
                    continue
                seen.add(text)
            stats.kept += 1
            yield text
