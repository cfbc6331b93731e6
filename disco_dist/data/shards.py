"""WebDataset shards of sentences (optionally with cached teacher embeddings) and their index.

A shard folder holds `shard-000000.tar`, ... and `index.json`:
    {"format": 1, "total": N, "shards": [{"name", "samples", "sha256", "bytes"}, ...], "source": ...,
     "source_sha256": ..., "seed": ..., "dropped": {...}, "teacher": null | {"model", "dim", "dtype"}}
Each sample is `<key>.txt` (UTF-8 sentence) and, in teacher-cached shards, `<key>.teacher.f16` (the teacher's
embedding as raw little-endian float16); in tokenised shards also `<key>.ids` (a student's token ids, the dtype
and tokenizer recorded in the index's "tokens": see token_ids.py).
The index is what lets every rank know the epoch's length up front.
Everything is written to temporary names and renamed, the index last: a folder with an index is complete.
A folder is read from where `stream.py` says: on disk, from an http(s) server or through a `pipe:` command; each
shard is checked against its sha256 as it is read, before any of its samples is used.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import RankError, UserError
from ..core.files import sha256_of, write_json_atomic
from .stream import check_base, fetch, is_remote, join
from .tar_members import tar_samples

INDEX = "index.json"
FORMAT = 1
TEACHER_KEY = "teacher.f16"
IDS_KEY = "ids"


@dataclass
class ShardIndex:
    folder: Path | str  # a local folder, an http(s) base URL or a pipe: command (see stream.py)
    shards: list  # [{"name", "samples", "sha256"}]
    total: int
    teacher: dict | None
    meta: dict
    index_sha256: str = ""  # of index.json itself: what a cache made from these shards records
    skipped: list = field(default_factory=list)  # names of bad shards left out by `verified_index`

    def paths(self) -> list:
        return [join(self.folder, s["name"]) for s in self.shards]

    @property
    def counts(self) -> list:
        return [s["samples"] for s in self.shards]

    def without(self, numbers) -> "ShardIndex":
        drop = set(numbers)
        shards = [s for i, s in enumerate(self.shards) if i not in drop]
        total = sum(s["samples"] for s in shards)
        return ShardIndex(self.folder, shards, total, self.teacher, self.meta, self.index_sha256)


def verified_index(index: ShardIndex, rank: int, world_size: int, bad_shards: str = "stop", log=print) -> ShardIndex:
    """Check every shard against its index entry (sha256), each rank hashing its share. A shard that was
    truncated, corrupted or changed after indexing stops the run (`bad_shards="stop"`) or is left out on every
    rank alike (`"skip"`, with a warning), so the ranks still agree on the batch count. Collective.

    Shards on a server are not read twice for "stop": every shard is checked as it streams, before use."""
    from ..cluster import distributed

    remote = is_remote(index.folder)
    if remote and bad_shards != "skip":
        return index
    mine = range(rank, len(index.shards), world_size)
    paths = index.paths()
    if remote:
        digest = lambda i: fetch(paths[i], index.shards[i].get("bytes"), log=log).sha256  # noqa: E731
    else:
        digest = lambda i: sha256_of(paths[i])  # noqa: E731
    bad = [i for i in mine if digest(i) != index.shards[i]["sha256"]]
    if world_size > 1:
        bad = [i for per_rank in distributed.all_gather_objects(bad) for i in per_rank]
    if not bad:
        return index
    bad.sort()
    names = ", ".join(index.shards[i]["name"] for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
    what = (
        f"{len(bad)} shard(s) of {index.folder} do not match {INDEX} ({names}): "
        "truncated, corrupt or changed after indexing"
    )
    if bad_shards != "skip":
        raise UserError(f"{what}; re-make or restore them, or pass --bad-shards skip to train without them")
    kept = index.without(bad)
    if not kept.shards:
        raise UserError(f"{what}, and no good shard is left; re-make the shard folder")
    if rank == 0:
        log(f"warning: {what}; skipping them ({index.total - kept.total} of {index.total} sentences)")
    kept.skipped = [index.shards[i]["name"] for i in bad]
    return kept


def read_index(folder) -> ShardIndex:
    if is_remote(folder):
        return _read_remote_index(str(folder))
    folder = Path(folder)
    path = folder / INDEX
    if not folder.is_dir():
        raise UserError(f"shard folder {folder} does not exist; make it with `python launchers/make_shards.py`")
    if not path.is_file():
        raise UserError(
            f"{path} is missing (an unfinished or foreign shard folder); "
            "re-run `python launchers/make_shards.py` into a new folder"
        )
    index = _parse_index(path.read_bytes(), folder, path)
    for shard in index.shards:
        file = folder / shard["name"]
        if not file.is_file():
            raise UserError(f"{file} is listed in {path} but missing; re-make or re-copy the shard folder")
    return index


def _read_remote_index(base: str) -> ShardIndex:
    check_base(base)
    location = join(base, INDEX)
    return _parse_index(fetch(location, error=UserError).data, base, location)


def _parse_index(content: bytes, folder, where) -> ShardIndex:
    try:
        raw = json.loads(content)
        shards, total = raw["shards"], int(raw["total"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{where} is not a disco-dist shard index ({err}); re-make the shards") from None
    if not shards:
        raise UserError(f"{where} lists no shards; the corpus had no usable sentences")
    for shard in shards:
        name = shard.get("name") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise UserError(
                f"{where} lists a shard named {name!r}, which leaves the shard folder (a name must be a plain file "
                "name); refused: re-make the shards or check where the index comes from"
            )
    if sum(s["samples"] for s in shards) != total:
        raise UserError(f"{where}: shard sample counts do not add up to total={total}; the index is corrupt")
    meta = {k: v for k, v in raw.items() if k not in ("shards", "total", "teacher")}
    return ShardIndex(folder, shards, total, raw.get("teacher"), meta, hashlib.sha256(content).hexdigest())


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

    def write(self, key: str, text: str, teacher: np.ndarray | None = None, ids: np.ndarray | None = None) -> None:
        sample = {"__key__": key, "txt": text.encode("utf-8")}
        if teacher is not None:
            sample[TEACHER_KEY] = np.asarray(teacher, dtype="<f2").tobytes()
        if ids is not None:  # already in the index's dtype
            sample[IDS_KEY] = ids.tobytes()
        self._writer.write(sample)
        self.samples += 1

    def close(self) -> dict:
        """Finish the file and return its index entry."""
        self._writer.close()
        self._file.close()
        os.replace(self._tmp, self.path)
        return shard_entry(self.path, self.samples)


def shard_entry(path: Path, samples: int) -> dict:
    """The index entry of a finished shard file: what a reader checks it against."""
    return {"name": path.name, "samples": samples, "sha256": sha256_of(path), "bytes": path.stat().st_size}


def prepare_output_folder(folder, overwrite: bool, keep_finished_shards: bool = False) -> Path:
    """Make `folder` ready for new shards. Half-written shards (`.tmp`) always go; finished shards of an
    unfinished folder (no index) are kept with `keep_finished_shards`, so that a pass can continue."""
    folder = Path(folder)
    if (folder / INDEX).exists() and not overwrite:
        raise UserError(f"{folder} already holds shards; choose a new --out folder (or --overwrite)")
    folder.mkdir(parents=True, exist_ok=True)
    stale = list(folder.glob("shard-*.tar.tmp")) + list(folder.glob(INDEX))
    if overwrite or not keep_finished_shards:
        stale += list(folder.glob("shard-*.tar"))
    for path in stale:
        path.unlink()
    return folder


def write_index(folder, total: int, shards: list, **meta) -> ShardIndex:
    """The last step of making a shard folder: after it, the folder is complete."""
    if not shards:
        raise UserError("no usable sentences to write: every line was empty, duplicate or undecodable")
    content = {"format": FORMAT, "total": total, **meta, "shards": shards}
    write_json_atomic(Path(folder) / INDEX, content)
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


def count_shard_samples(path) -> int:
    """Samples in one finished tar shard (0 for a file that is not a readable tar)."""
    import tarfile

    try:
        with tarfile.open(path) as tar:
            return len({Path(name).name.split(".", 1)[0] for name in tar.getnames()})
    except (tarfile.TarError, OSError):
        return 0


def iter_shard_samples(index: ShardIndex, numbers=None, with_keys=False, log=print, with_ids=False):
    """(text, teacher embedding or None) from shards `numbers` of the index (default: all) in that order
    (with `with_keys`: (key, text, teacher); with `with_ids` each tuple ends with the token ids, or None where the
    shards hold none). Each shard is read whole, from wherever the index lives, and its
    samples are used only once its sha256 matches the index: a shard changed during a run stops it."""
    paths = index.paths()
    ids_dtype = (index.meta.get("tokens") or {}).get("dtype", "<u4")
    for i in range(len(index.shards)) if numbers is None else numbers:
        entry = index.shards[i]
        shard = fetch(paths[i], entry.get("bytes"), log=log)
        if shard.sha256 != entry["sha256"]:
            raise RankError(
                f"{paths[i]} does not match {INDEX} (sha256 {shard.sha256[:12]}..., indexed "
                f"{entry['sha256'][:12]}...): changed since the shards were made or checked; restore or re-make "
                "it and rerun (training: --resume auto)"
            )
        for sample in tar_samples(shard.data, paths[i]):
            teacher = sample.get(TEACHER_KEY)
            teacher = None if teacher is None else np.frombuffer(teacher, dtype="<f2")
            text = sample["txt"].decode("utf-8")
            found = (sample["__key__"], text, teacher) if with_keys else (text, teacher)
            if with_ids:
                ids = sample.get(IDS_KEY)
                found += (None if ids is None else np.frombuffer(ids, dtype=ids_dtype),)
            yield found
