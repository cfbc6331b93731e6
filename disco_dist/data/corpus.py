"""Distillation corpora, streamed row by row: text (one sentence per line, optionally gzip), JSONL (`.jsonl`,
`.jsonl.gz`, `.ndjson`), Parquet, a `datasets` folder (`Dataset.save_to_disk`), or a folder of such files (read
in sorted order; other files are ignored and named).

`read_corpus` yields the sentences to keep, in corpus order: stripped, non-empty, within the length filters, first
occurrence only (64-bit hashes, `dedupe.py`); everything dropped is counted by reason. Nothing holds the corpus
in memory. A row that is not text (a number, a null, a missing field, a line that is not JSON) stops the read with
one line naming the file and row, or with `bad_rows="skip"` is dropped and counted. Text is never truncated.
"""

import gzip
import json
import zlib
from dataclasses import dataclass, fields
from pathlib import Path

from ..core.errors import UserError
from ..core.files import sha256_of
from ..core.iters import chunks
from .dedupe import SeenHashes

TEXT, JSONL, PARQUET, DATASETS = "text", "jsonl", "parquet", "datasets"
# the first suffix a name ends with decides (".jsonl.gz" before ".gz")
SUFFIXES = {
    ".jsonl": JSONL,
    ".jsonl.gz": JSONL,
    ".json": JSONL,
    ".json.gz": JSONL,
    ".ndjson": JSONL,
    ".parquet": PARQUET,
    ".txt": TEXT,
    ".gz": TEXT,
}
NOT_READ = (".csv", ".tsv", ".arrow", ".feather", ".zip", ".bz2", ".xz", ".zst", ".tar")
FORMATS_HELP = (
    "text (.txt, .gz), JSONL (.jsonl, .json, .ndjson, optionally .gz), Parquet, a datasets save_to_disk folder, "
    "or a folder of them"
)
CHUNK = 8192  # rows looked up in the seen-set at once


@dataclass
class CorpusStats:
    rows: int = 0
    empty: int = 0
    undecodable: int = 0
    bad: int = 0  # not text: a number, null, missing field, a line that is not JSON (with bad_rows="skip")
    too_short: int = 0
    too_long: int = 0
    duplicates: int = 0
    kept: int = 0

    def dropped(self) -> dict:
        names = {"duplicates": "duplicate"}
        return {
            names.get(f.name, f.name): getattr(self, f.name) for f in fields(self) if f.name not in ("rows", "kept")
        }


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    format: str


def corpus_files(path) -> list:
    """The files a corpus path stands for, each with its format; one line naming the path when there are none."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"corpus {path} does not exist; pass an existing file or folder: {FORMATS_HELP}")
    if path.is_file():
        if not _format_of(path) and path.name.lower().endswith(NOT_READ):
            raise UserError(f"{path}: this format is not read; convert it to one of: {FORMATS_HELP}")
        return [CorpusFile(path, _format_of(path) or TEXT)]  # a single file of another suffix is read as text
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise UserError(
            f"{path} is a datasets DatasetDict; pass one split's folder, e.g. {path / (splits or ['train'])[0]}"
        )
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return [CorpusFile(path, DATASETS)]
    files = [CorpusFile(p, _format_of(p)) for p in _visible_files(path) if _format_of(p)]
    if not files:
        raise UserError(f"corpus folder {path} holds no corpus file; it should hold {FORMATS_HELP}")
    return files


def ignored_files(path) -> list:
    path = Path(path)
    if not path.is_dir() or (path / "state.json").is_file():
        return []
    return [p for p in _visible_files(path) if not _format_of(p)]


def _visible_files(folder: Path) -> list:
    """Files under `folder` in sorted order, leaving out hidden ones (a name below `folder` starting with '.')."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    return next((fmt for suffix, fmt in SUFFIXES.items() if name.endswith(suffix)), None)


def source_sha256(path) -> str:
    """sha256 of a corpus file; of a folder, sha256 over its files' relative names and sha256 values."""
    path = Path(path)
    if path.is_file():
        return sha256_of(path)
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}\t{sha256_of(file)}\n".encode())
    return digest.hexdigest()


class _BadRow(Exception):
    """A row that is not text: (what, where) to name it."""


def read_corpus(
    path,
    stats: CorpusStats | None = None,
    limit: int | None = None,
    text_field: str = "text",
    min_chars: int = 0,
    max_chars: int | None = None,
    bad_rows: str = "stop",
    log=print,
):
    """Yield the corpus' sentences to keep, in file order (see the module docstring). `limit` stops after that
    many kept sentences (a prefix of a shuffled corpus is a uniform sample); `stats` counts what was read and
    dropped, up to the last row used."""
    stats = stats if stats is not None else CorpusStats()
    seen = SeenHashes()
    for chunk in chunks(_rows(corpus_files(path), text_field), CHUNK):
        verdicts = []  # per row: [the counter it goes to, or None to keep it; its text, or what is wrong]
        for file, row, value in chunk:
            if isinstance(value, _BadRow):
                verdicts.append(["bad", f"{file}: row {row}: {value}"])
            elif value is None:
                verdicts.append(["undecodable", None])
            else:
                text = value.strip()
                too_long = max_chars is not None and len(text) > max_chars
                counter = (
                    "empty" if not text else "too_short" if len(text) < min_chars else "too_long" if too_long else None
                )
                verdicts.append([counter, text])
        candidates = [verdict for verdict in verdicts if verdict[0] is None]
        for verdict, first in zip(candidates, seen.first_seen([text for _, text in candidates])):
            if not first:
                verdict[0] = "duplicates"
        for counter, text in verdicts:
            if limit is not None and stats.kept >= limit:
                return
            if counter == "bad":  # here, in order: a bad row past the limit is never reached
                if bad_rows != "skip":
                    raise UserError(f"{text}; fix the corpus, or pass --bad-rows skip to drop such rows (counted)")
                if not stats.bad:
                    log(f"warning: {text}; dropping such rows (--bad-rows skip), counted as 'bad'")
            stats.rows += 1
            if counter is None:
                stats.kept += 1
                yield text
            else:
                setattr(stats, counter, getattr(stats, counter) + 1)


def _rows(files, text_field: str):
    """(file, row number, value) per row of every file: value is a str, None (bytes that are not UTF-8) or a
    _BadRow."""
    for file in files:
        reader = {TEXT: _text_rows, JSONL: _jsonl_rows, PARQUET: _parquet_rows, DATASETS: _dataset_rows}[file.format]
        row = 0
        try:
            for row, value in enumerate(reader(file.path, text_field), 1):
                yield file.path, row, value
        except (OSError, EOFError, zlib.error) as err:
            raise UserError(
                f"{file.path}: unreadable after row {row} ({err.__class__.__name__}: {err}); "
                "the file is corrupt or truncated: re-copy or re-export it"
            ) from None


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _text_rows(path: Path, text_field: str):
    with _open(path) as f:
        for raw in f:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                yield None


def _jsonl_rows(path: Path, text_field: str):
    with _open(path) as f:
        for raw in f:
            if not raw.strip():
                yield ""  # a blank line: counted as empty
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield None  # as in a text file: counted as undecodable
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                yield _BadRow(f"not a JSON line ({err})")
                continue
            if not isinstance(row, dict):
                yield _BadRow(f"a JSON {type(row).__name__}, not an object with a {text_field!r} field")
            elif text_field not in row:
                fields_ = ", ".join(list(row)[:8]) or "none"
                yield _BadRow(f"no field {text_field!r} (the row has: {fields_}); pass --text-field NAME")
            else:
                yield _checked(row[text_field], text_field)


def _checked(value, text_field: str):
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # a lone surrogate ("\\ud800" in JSON) is not text either: undecodable
        except UnicodeEncodeError:
            return None
        return value
    return _BadRow(f"field {text_field!r} is {'null' if value is None else type(value).__name__}, not text")


def _parquet_rows(path: Path, text_field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path}: not a readable Parquet file ({err}); re-copy or re-export it") from None
    _check_column(path, file.schema_arrow, text_field)
    try:
        for batch in file.iter_batches(batch_size=CHUNK, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                yield _checked(value, text_field)
    except pa.ArrowException as err:
        raise OSError(str(err)) from None


def _check_column(path, schema, text_field: str) -> None:
    import pyarrow as pa

    if text_field not in schema.names:
        raise UserError(
            f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); pass --text-field NAME"
        )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column {text_field!r} holds {kind}, not text; pass --text-field NAME")


def _dataset_rows(path: Path, text_field: str):
    import pyarrow as pa
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))  # memory-mapped Arrow files: rows are read as they are used
    except (pa.ArrowException, ValueError, KeyError, FileNotFoundError) as err:
        raise UserError(f"{path}: not a readable datasets folder ({err}); re-save it with save_to_disk") from None
    _check_column(path, dataset.features.arrow_schema, text_field)
    try:
        for batch in dataset.select_columns([text_field]).iter(batch_size=CHUNK):
            for value in batch[text_field]:
                yield _checked(value, text_field)
    except pa.ArrowException as err:
        raise OSError(str(err)) from None
