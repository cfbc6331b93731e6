"""Where shards are read from: a local folder, an http(s):// base URL, or a `pipe:` command; whole files into memory,
hashed while they stream, with a bounded number of retries from the start of the file when a transfer breaks.

    runs/shards                                       a local folder
    http://host:8000/shards                           index.json and shard-*.tar fetched from under it
    https://host/shards/{name}?sig=...                {name} marks where the file name goes (signed URLs)
    pipe:aws s3 cp s3://bucket/shards/{name} -        a command printing the file {name} on stdout (split into
                                                      words as a shell would, run without a shell)

A shard is small (1,000 sentences: 1 MB of tar, ~3 MB with 768-wide teacher embeddings), so it is held in memory,
never written to disk, and its sha256 is checked before any of its samples is used. `DISCO_SHARD_RETRIES` (default
3) sets the retries per file, `DISCO_SHARD_TIMEOUT` (default 60 s) how long a silent server is waited for.
A server is not trusted with memory: a shard whose recorded size is over `DISCO_SHARD_MAX_BYTES` (default 4 GiB) is
refused before it is read, and a response is read up to the size `index.json` records (or that cap) and no further.
"""

import hashlib
import http.client
import os
import shlex
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import RankError, UserError

CHUNK = 1 << 20


def is_remote(location) -> bool:
    return str(location).startswith(("http://", "https://", "pipe:"))


def join(base, name: str) -> str:
    """The location of file `name` of the shard folder at `base`."""
    base = str(base)
    if "{name}" in base and is_remote(base):
        return base.replace("{name}", name)
    if base.startswith(("http://", "https://")):
        return base.rstrip("/") + "/" + name
    return str(Path(base) / name)


def location(value: str):
    """A --shards value as the flag keeps it: a URL or command as given, a local folder as a Path."""
    return value if is_remote(value) else Path(value)


def describe(location) -> str:
    """How an index records where its source was: a URL or command as given, a folder as an absolute path."""
    return str(location) if is_remote(location) else str(Path(location).resolve())


def check_base(base) -> None:
    base = str(base)
    if not base.startswith("pipe:"):
        return
    if "{name}" not in base:
        raise UserError(
            f"--shards {base}: a pipe: command must name the file it prints as {{name}}, "
            "e.g. 'pipe:aws s3 cp s3://bucket/shards/{name} -'"
        )
    try:
        if not shlex.split(base[len("pipe:") :]):
            raise ValueError("no command")
    except ValueError as err:
        raise UserError(f"--shards {base}: the command cannot be split into words ({err}); check its quotes") from None


class TransferError(Exception):
    """A transfer that broke (refused, cut, timed out, short, a failing command): worth another try."""


class NotFound(Exception):
    """The server (or command) answered that the file is not there: no retry helps."""


@dataclass
class Fetched:
    data: bytes
    sha256: str
    tries: int


def _env_number(name: str, default: float, cast=float, minimum: float = 0):
    value = os.environ.get(name, str(default))
    try:
        number = cast(value)
    except ValueError:
        number = -1
    if number < minimum:
        raise UserError(f"{name}={value!r}: give a number, {minimum} or more (default {default})")
    return number


def max_bytes() -> int:
    """The largest shard (or index) read into memory: `DISCO_SHARD_MAX_BYTES`, default 4 GiB."""
    return _env_number("DISCO_SHARD_MAX_BYTES", 1 << 32, int, minimum=1)


def retries() -> int:
    return _env_number("DISCO_SHARD_RETRIES", 3, int)


def timeout() -> float:
    """Seconds without a byte from a server or a pipe: command before the try is given up."""
    return _env_number("DISCO_SHARD_TIMEOUT", 60.0, minimum=0.001)


def _read_http(url: str, digest, limit: int) -> bytes:
    try:
        response = urllib.request.urlopen(url, timeout=timeout())
    except urllib.error.HTTPError as err:
        if err.code in (404, 410):
            raise NotFound(f"HTTP {err.code} {err.reason}") from None
        raise TransferError(f"HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, reset, a bad status line
        raise TransferError(str(getattr(err, "reason", err)) or err.__class__.__name__) from None
    except ValueError as err:  # not a URL urllib can open (a bad port, an unknown scheme)
        raise NotFound(f"not a URL that can be opened ({err})") from None
    with response:
        declared = response.headers.get("Content-Length")
        declared = int(declared) if declared and declared.isdigit() else None
        if declared is not None and declared > limit:
            raise TransferError(f"the server announced {declared:,} bytes, more than the {limit:,} bytes expected")
        parts, held = [], 0
        try:
            # read(n) returns short data, not an error, when the server closes early: the length check below
            while block := response.read(min(CHUNK, limit + 1 - held)):
                digest.update(block)
                parts.append(block)
                held += len(block)
                if held > limit:  # never hold more than expected: the rest is not read
                    raise TransferError(f"the server sent more than the {limit:,} bytes expected; cut off there")
        except (OSError, ValueError, http.client.HTTPException) as err:  # reset, timeout, a cut chunked response
            raise TransferError(f"connection broken after {sum(map(len, parts))} bytes ({err!r})") from None
    data = b"".join(parts)
    if declared is not None and len(data) != declared:
        raise TransferError(f"connection closed after {len(data)} of {declared} bytes")
    return data


def _read_pipe(command: str, digest, limit: int) -> bytes:
    words = shlex.split(command)  # split as a shell would, run without one (see tests/test_safety.py)
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty command cannot block on it
        try:
            process = subprocess.Popen(words, stdout=subprocess.PIPE, stderr=stderr)
        except OSError as err:
            raise NotFound(f"cannot run {words[0] if words else 'an empty command'} ({err.strerror})") from None
        parts, alive, stalled, held = [], threading.Event(), [], 0
        threading.Thread(target=_kill_when_silent, args=(process, alive, stalled), daemon=True).start()
        while block := process.stdout.read(min(CHUNK, limit + 1 - held)):
            alive.set()
            digest.update(block)
            parts.append(block)
            held += len(block)
            if held > limit:
                process.kill()
                process.wait()
                raise TransferError(f"`{command}` printed more than the {limit:,} bytes expected; cut off there")
        process.stdout.close()
        process.wait()
        alive.set()  # the watchdog sees the process ended and returns
        if stalled:
            raise TransferError(f"`{command}` printed nothing for {timeout():g} s (DISCO_SHARD_TIMEOUT)")
        if process.returncode != 0:
            stderr.seek(0)
            said = stderr.read().decode(errors="replace").strip().splitlines()
            raise TransferError(f"`{command}` exited with {process.returncode}" + (f": {said[-1]}" if said else ""))
    return b"".join(parts)


def _kill_when_silent(process, alive: threading.Event, stalled: list) -> None:
    """Kill `process` once it has printed nothing for `timeout()` seconds (a hung download), noting it in
    `stalled`; `alive` is set by the reader at every block."""
    seconds = timeout()
    while process.poll() is None:
        if not alive.wait(seconds):
            if process.poll() is None:
                stalled.append(seconds)
                process.kill()
            return
        alive.clear()


def _read_local(path: str, digest) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:  # missing, not readable, a folder: no retry helps
        raise NotFound(err.strerror or str(err)) from None
    digest.update(data)
    return data


def fetch(location: str, size: int | None = None, log=print, error=RankError) -> Fetched:
    """The whole file at `location`, hashed as it streams. A broken transfer (or fewer than `size` bytes, where
    the index records the size) is retried from the start, `retries()` times with 1, 2, 4, ... s between tries;
    then, or for a file that is not there, one line naming the location (`error`: RankError where this rank
    alone reads the file, UserError where every rank does). A remote file is read up to `size` (or `max_bytes()`)
    bytes and no further; a `size` over `max_bytes()` is refused before anything is read."""
    cap = max_bytes()
    if size is not None and size > cap:
        raise error(
            f"{location} is {size:,} bytes by index.json, over DISCO_SHARD_MAX_BYTES={cap:,}: refused before "
            "reading; raise DISCO_SHARD_MAX_BYTES if the shard is right, or make smaller shards"
        )
    limit = cap if size is None else size
    attempts = retries() + 1
    for attempt in range(1, attempts + 1):
        digest = hashlib.sha256()
        try:
            if location.startswith("pipe:"):
                data = _read_pipe(location[len("pipe:") :], digest, limit)
            elif location.startswith(("http://", "https://")):
                data = _read_http(location, digest, limit)
            else:
                data = _read_local(location, digest)
            if size is not None and len(data) < size and is_remote(location):  # a short local file is just bad
                raise TransferError(f"got {len(data)} of {size} bytes")
            return Fetched(data, digest.hexdigest(), attempt)
        except NotFound as err:
            raise error(f"could not read {location}: {err}; check the --shards location") from None
        except TransferError as err:
            if attempt == attempts:
                raise error(
                    f"could not read {location} in {attempts} tries ({err}); check the server or network, "
                    "then rerun (training: --resume auto; DISCO_SHARD_RETRIES sets the tries)"
                ) from None
            wait = 2 ** (attempt - 1)
            log(f"warning: reading {location} failed ({err}); try {attempt + 1} of {attempts} in {wait} s")
            time.sleep(wait)
    raise AssertionError("unreachable")
