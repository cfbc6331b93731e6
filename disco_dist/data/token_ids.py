"""A student's token ids stored in the shards: made once by a pass over a shard folder, recognised by the loader,
padded into a batch without the tokenizer.

Tokenising is most of the stage-1 loader's time on the host (docs/benchmarks.md, "The loader per core"); a GPU
consumes sentences faster than a few cores tokenise them. The pass writes a new folder with the same shards, each
sample gaining `<key>.ids` (the ids of the prompt + sentence, truncated at the max length, as raw little-endian
uint16 or uint32), and records in `index.json` what made them:
    "tokens": {"student", "fingerprint", "max_length", "dtype", "vocab_size", "sentences_per_s", ...}
The fingerprint is a sha256 of the tokenizer's full definition, the prompt and the max length: a run whose student
tokenises differently does not use the ids (it tokenises the text, and says so once).

    python launchers/tokenize_shards.py --shards runs/demo/shards-teacher --student all-MiniLM-L6-v2 --out OUT
"""

import hashlib
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UserError
from ..core.progress import Progress
from .shards import ShardFile, iter_shard_samples, prepare_output_folder, read_index, shard_entry, write_index
from .stream import describe, is_remote


def fingerprint(encoder) -> str | None:
    """sha256 of what decides a sentence's ids: the tokenizer's definition (vocabulary, normaliser, pre-tokeniser,
    post-processor, special tokens) without the truncation and padding state every call resets, its class and
    truncation side, the prompt and the max length. None for a tokenizer without a serialisable definition."""
    tokenizer = encoder.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    settings = [type(tokenizer).__name__, tokenizer.truncation_side, getattr(tokenizer, "split_special_tokens", None)]
    text = json.dumps([definition, settings, encoder.prompt, encoder.max_length], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def ids_dtype(encoder) -> str:
    """uint16 where every id fits (the largest id, not the vocabulary's size: ids can have gaps), else uint32."""
    tokenizer = encoder.tokenizer
    return "<u2" if max(tokenizer.get_vocab().values(), default=0) < 2**16 and len(tokenizer) <= 2**16 else "<u4"


def token_ids(encoder, sentences: list) -> list:
    """Each sentence's ids (prompt + sentence, special tokens, truncated at the max length): `Encoder.tokenize`
    without the padding."""
    ids = encoder.tokenizer([encoder.prompt + s for s in sentences], truncation=True, max_length=encoder.max_length)
    return ids["input_ids"]


def pad(encoder, ids: list) -> dict:
    """A batch of stored ids as `Encoder.tokenize` gives it for the same sentences: input_ids and attention_mask,
    padded to the longest on the tokenizer's padding side with its pad token."""
    length = max(len(row) for row in ids)
    input_ids = np.full((len(ids), length), encoder.tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(ids), length), dtype=np.int64)
    left = encoder.tokenizer.padding_side == "left"
    for i, row in enumerate(ids):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        input_ids[i, span] = row
        mask[i, span] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}


def usable(index, encoder) -> bool:
    """Whether the shards hold ids this student's tokenizer would make (else the loader tokenises the text)."""
    tokens = index.meta.get("tokens")
    return bool(tokens) and tokens.get("fingerprint") is not None and tokens["fingerprint"] == fingerprint(encoder)


def mismatch_note(index, encoder) -> str | None:
    """One line for a run whose shards hold ids of another tokenizer or max length; None where nothing to say."""
    tokens = index.meta.get("tokens")
    if not tokens or usable(index, encoder):
        return None
    return (
        f"{index.folder} holds token ids made for {tokens.get('student')} (max length {tokens.get('max_length')}); "
        "this student tokenises differently, so the loader tokenises the text (make ids for it with "
        "`python launchers/tokenize_shards.py`)"
    )


_WORKER = {}


def _start_worker(student: str, max_length: int | None) -> None:
    from ..models.encoder import Encoder

    torch.set_num_threads(1)
    _WORKER["encoder"] = Encoder.from_pretrained(student, max_length=max_length)


def _tokenize_shard(job: tuple) -> tuple:
    """One shard of the pass, in a worker: (sentences, tokens) written."""
    source_folder, number, out_folder, dtype = job
    encoder = _WORKER["encoder"]
    source = read_index(source_folder)
    samples = list(iter_shard_samples(source, [number], with_keys=True))
    ids = token_ids(encoder, [text for _, text, _ in samples])
    shard = ShardFile(Path(out_folder) / source.shards[number]["name"])
    for (key, text, teacher), row in zip(samples, ids):
        shard.write(key, text, teacher, np.asarray(row, dtype=dtype))
    shard.close()
    return len(samples), sum(len(row) for row in ids)


def tokenize_shards(source_folder, out_folder, student: str, max_length=None, workers=1, overwrite=False, log=print):
    """Write `out_folder`: the shards of `source_folder` (text, and teacher embeddings where cached) with each
    sentence's token ids for `student`, and an index recording them. `workers` processes tokenise shards at once.
    The source is read (and each shard checked against its sha256) but never changed."""
    from ..models.encoder import Encoder

    source = read_index(source_folder)
    if not is_remote(source_folder) and Path(out_folder).resolve() == Path(source_folder).resolve():
        raise UserError(f"--out {out_folder} is the source folder: write the tokenised shards to a new folder")
    if source.meta.get("tokens"):
        log(f"{source_folder} already holds token ids ({source.meta['tokens'].get('student')}); replacing them")
    encoder = Encoder.from_pretrained(student, max_length=max_length)
    print_ = fingerprint(encoder)
    if print_ is None:
        raise UserError(f"{student}: its tokenizer has no fast (serialisable) definition; ids cannot be matched")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    out_folder = prepare_output_folder(out_folder, overwrite)
    dtype = ids_dtype(encoder)
    start, tokens = time.perf_counter(), 0
    progress = Progress("tokenize_shards", "shards", total=len(source.shards), log=log)
    jobs = [(str(source.folder), i, str(out_folder), dtype) for i in range(len(source.shards))]
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(student, max_length)) as pool:
        for _, shard_tokens in pool.imap(_tokenize_shard, jobs):
            tokens += shard_tokens
            progress.update()
    progress.close()
    seconds = time.perf_counter() - start
    entries = [shard_entry(out_folder / entry["name"], entry["samples"]) for entry in source.shards]
    meta = {k: v for k, v in source.meta.items() if k not in ("format", "tokens")}
    index = write_index(
        out_folder,
        source.total,
        entries,
        **meta,
        teacher=source.teacher,
        tokens_source=describe(source_folder),
        tokens={
            "student": str(student),
            "fingerprint": print_,
            "max_length": encoder.max_length,
            "prompt": encoder.prompt,
            "dtype": dtype,
            "vocab_size": len(encoder.tokenizer),
            "tokens": tokens,
            "workers": workers,
            "seconds": round(seconds, 2),
            "sentences_per_s": round(source.total / seconds, 1),
        },
    )
    log(
        f"wrote {index.total} sentences with {student}'s token ids in {len(entries)} shards to {out_folder} "
        f"({index.meta['tokens']['sentences_per_s']} sentences/s on {workers} worker(s))"
    )
    return index
