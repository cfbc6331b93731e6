"""WebDataset shards of sentences (optionally with cached teacher embeddings) and their index.

A shard folder holds `shard-000000.tar`, ... and `index.json`:
    {"format": 1, "total": N, "shards": [{"name", "samples", "sha256"}, ...], "source": ..., "source_sha256": ...,
     "seed": ..., "dropped": {...}, "teacher": null | {"model", "dim", "dtype"}}
Each sample is `<key>.txt` (UTF-8 sentence) and, in teacher-cached shards, `<key>.teacher.f16` (the teacher's
embedding as raw little-endian float16). The index is what lets every rank know the epoch's length up front.
Everything is written to temporary names and renamed, the index last: a folder with an index is complete.
"""
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.corpus import CorpusStats, read_corpus
from .errors import UserError
from .fetch import sha256_of

INDEX = "index.json"
FORMAT = 1
TEACHER_KEY = "teacher.f16"


@dataclass
class ShardIndex:
    folder: Path
    shards: list  # [{"name", "samples", "sha256"}]
    total: int
    teacher: dict | None
    meta: dict

    def paths(self) -> list:
        return [str(self.folder / s["name"]) for s in self.shards]

    @property
    def counts(self) -> list:
        return [s["samples"] for s in self.shards]


def read_index(folder) -> ShardIndex:
    folder = Path(folder)
    path = folder / INDEX
    if not folder.is_dir():
        raise UserError(f"shard folder {folder} does not exist; make it with `python launchers/make_shards.py`")
    if not path.is_file():
        raise UserError(f"{path} is missing (an unfinished or foreign shard folder); "
                        "re-run `python launchers/make_shards.py` into a new folder")
    try:
        raw = json.loads(path.read_text())
        shards, total = raw["shards"], int(raw["total"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a disco-dist shard index ({err}); re-make the shards") from None
    if not shards:
        raise UserError(f"{path} lists no shards; the corpus had no usable sentences")
    if sum(s["samples"] for s in shards) != total:
        raise UserError(f"{path}: shard sample counts do not add up to total={total}; the index is corrupt")
    for shard in shards:
        file = folder / shard["name"]
        if not file.is_file():
            raise UserError(f"{file} is listed in {path} but missing; re-make or re-copy the shard folder")
    meta = {k: v for k, v in raw.items() if k not in ("shards", "total", "teacher")}
    return ShardIndex(folder, shards, total, raw.get("teacher"), meta)


class ShardFile:
    """One tar shard written under a temporary name and renamed into place when closed."""

    def __init__(self, path):
        import webdataset as wds

        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self._tmp, "wb")
        # fixed mtime and owner: the same input and seed give byte-identical shards
        self._writer = wds.TarWriter(self._file, mtime=0, user="disco", group="disco")
        self.samples = 0

    def write(self, key: str, text: str, teacher: np.ndarray | None = None) -> None:
        sample = {"__key__": key, "txt": text.encode("utf-8")}
        if teacher is not None:
            sample[TEACHER_KEY] = np.asarray(teacher, dtype="<f2").tobytes()
        self._writer.write(sample)
        self.samples += 1

    def close(self) -> dict:
        """Finish the file and return its index entry."""
        self._writer.close()
        self._file.close()
        os.replace(self._tmp, self.path)
        return {"name": self.path.name, "samples": self.samples, "sha256": sha256_of(self.path)}


def prepare_output_folder(folder, overwrite: bool) -> Path:
    folder = Path(folder)
    if (folder / INDEX).exists() and not overwrite:
        raise UserError(f"{folder} already holds shards; choose a new --out folder (or --overwrite)")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in list(folder.glob("shard-*.tar*")) + list(folder.glob(INDEX)):
        stale.unlink()  # an earlier, unfinished attempt (no index) or the folder being overwritten
    return folder


def write_index(folder, total: int, shards: list, **meta) -> ShardIndex:
    """The last step of making a shard folder: after it, the folder is complete."""
    if not shards:
        raise UserError("no usable sentences to write: every line was empty, duplicate or undecodable")
    content = {"format": FORMAT, "total": total, **meta, "shards": shards}
    tmp = Path(folder) / f"{INDEX}.tmp"
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, Path(folder) / INDEX)
    return read_index(folder)


class ShardFolderWriter:
    """Writes samples into numbered shards of `shard_size` samples, then the index."""

    def __init__(self, folder, shard_size: int, overwrite: bool = False):
        if shard_size < 1:
            raise UserError(f"--shard-size must be at least 1, got {shard_size}")
        self.folder = prepare_output_folder(folder, overwrite)
        self.shard_size = shard_size
        self.shards = []
        self._current = None
        self.total = 0

    def write(self, text: str, teacher: np.ndarray | None = None) -> None:
        if self._current is None:
            self._current = ShardFile(self.folder / shard_name(len(self.shards)))
        self._current.write(f"{self.total:09d}", text, teacher)
        self.total += 1
        if self._current.samples == self.shard_size:
            self.shards.append(self._current.close())
            self._current = None

    def finish(self, **meta) -> ShardIndex:
        if self._current is not None:
            self.shards.append(self._current.close())
            self._current = None
        return write_index(self.folder, self.total, self.shards, **meta)


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def make_shards(corpus, out, shard_size=1000, seed=0, limit=None, overwrite=False, log=print) -> ShardIndex:
    """Text corpus -> shuffled shards + index. Deterministic for a given corpus, limit and seed."""
    stats = CorpusStats()
    sentences = list(read_corpus(corpus, stats, limit=limit))
    random.Random(seed).shuffle(sentences)
    writer = ShardFolderWriter(out, shard_size, overwrite)
    for sentence in sentences:
        writer.write(sentence)
    dropped = {"empty": stats.empty, "duplicate": stats.duplicates, "undecodable": stats.undecodable}
    index = writer.finish(source=str(Path(corpus).resolve()), source_sha256=sha256_of(corpus), seed=seed,
                          limit=limit, lines_read=stats.lines, dropped=dropped, teacher=None)
    log(f"wrote {index.total} sentences in {len(index.shards)} shards to {out} "
        f"(read {stats.lines} lines; dropped {stats.empty} empty, {stats.duplicates} duplicate, "
        f"{stats.undecodable} undecodable)")
    return index


def iter_shard_samples(paths, handler=None, with_keys=False):
    """(text, teacher embedding or None) from the given tar shards in order, via webdataset
    (with `with_keys`: (key, text, teacher))."""
    import webdataset as wds

    dataset = wds.WebDataset(paths, shardshuffle=False, nodesplitter=None, workersplitter=None,
                             empty_check=False, handler=handler or wds.reraise_exception)
    for sample in dataset:
        teacher = sample.get(TEACHER_KEY)
        teacher = None if teacher is None else np.frombuffer(teacher, dtype="<f2")
        text = sample["txt"].decode("utf-8")
        yield (sample["__key__"], text, teacher) if with_keys else (text, teacher)
