"""The samples of a WebDataset tar shard held in memory, read straight from its 512-byte headers.

Python's `tarfile` (what webdataset's reader uses) spent 85% of the stage-1 loader's time parsing headers once the
token ids were stored in the shards (cProfile, 100,000 sentences, docs/benchmarks.md). This reader parses only what
a shard needs: ustar names (with their prefix), sizes (octal or base-256), pax `path` records and GNU long names;
it yields regular files and skips directories, and groups the files into samples the way webdataset does: the key
is the name up to the first dot of its last component, the rest the field (lower-cased); consecutive files with the
same key form one sample; `__...__` names are skipped.
A shard is data, never a file tree: a link, a device or FIFO, or a member named by an absolute path or with a `..`
component stops the read with one line naming the shard and the member (webdataset would skip the first two and
use the last two as keys; nothing here writes them to disk, but a shard holding them was not made by a shard writer).
"""

import re

from ..core.errors import RankError

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")
REFUSED = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"6": "a FIFO",
}
META = re.compile(r"__[^/]*__($|/)")
KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _number(field: bytes, where: str) -> int:
    """A header's numeric field: NUL/space-padded octal, or base-256 when the first byte's high bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise RankError(f"{where}: a tar header's number field {field!r} is not a number (corrupt shard)") from None


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")  # as tarfile reads a name that is not UTF-8


def _pax_path(body: bytes, where: str) -> str | None:
    """The `path` record of a pax extended header ("<length> path=<value>\\n" records)."""
    position = 0
    found = None
    while position < len(body):
        space = body.find(b" ", position)
        if space < 0:
            break
        try:
            length = int(body[position:space])
        except ValueError:
            length = 0
        if length <= space - position:
            raise RankError(f"{where}: a pax header's record is malformed (corrupt shard)")
        record = body[space + 1 : position + length - 1]
        keyword, _, value = record.partition(b"=")
        if keyword == b"path":
            found = _name(value)
        position += length
    return found


def regular_files(data: bytes, where: str):
    """(name, content) of every regular file of the tar archive `data`, in order. A member that runs past the end
    stops with one line naming `where` (a truncated shard)."""
    offset, size_of_data, long_name = 0, len(data), None
    while offset + BLOCK <= size_of_data:
        header = data[offset : offset + BLOCK]
        if header.count(0) == BLOCK:
            return  # the end-of-archive blocks
        size = _number(header[124:136], where)
        kind = header[156:157]
        start = offset + BLOCK
        end = start + size
        if end > size_of_data:
            raise RankError(f"{where}: a tar member runs past the end of the shard (truncated or corrupt)")
        offset = start + -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"L"):  # the next member's full name
            long_name = _pax_path(data[start:end], where) if kind == b"x" else _name(data[start:end].split(b"\0", 1)[0])
            continue
        if kind == b"g":
            continue
        name, long_name = long_name, None
        if name is None:
            name = _name(header[0:100].split(b"\0", 1)[0])
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = _name(prefix) + "/" + name
        if kind in REFUSED or name.startswith("/") or ".." in name.split("/"):
            what = REFUSED.get(kind) or ("an absolute path" if name.startswith("/") else "a '..' path")
            raise RankError(f"{where}: member {name!r} is {what}; a shard holds files only: refused (re-make it)")
        if kind not in REGULAR:
            continue
        yield name, data[start:end]


def tar_samples(data: bytes, where: str):
    """The samples of a WebDataset shard: {"__key__": key, field: bytes, ...}, in order."""
    sample = None
    for name, content in regular_files(data, where):
        if META.match(name):
            continue
        match = KEY.match(name)
        if match is None:
            continue
        key, field = match.group(1), match.group(2).lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key}
        if field in sample:
            raise RankError(f"{where}: {name} appears twice in the shard (corrupt shard)")
        sample[field] = content
    if sample is not None:
        yield sample
