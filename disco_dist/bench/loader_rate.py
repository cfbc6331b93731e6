"""How fast the stage-1 loader feeds W ranks from a shard folder and from the same folder behind an HTTP server,
side by side in one run, against what training consumes. Prints a table (docs/benchmarks.md).

    python -m disco_dist.bench.loader_rate --shards runs/wiki1m --serve --ranks 2 --out runs/loader_rate.json

Each rank is a process running `ShardBatches` over one epoch (read and check shards, shuffle buffer, length
buckets, tokenise with the student's tokenizer, collate), one thread each; on shards holding the student's token
ids (`launchers/tokenize_shards.py`) it pads those instead of tokenising, as training does.
`--serve` starts `python -m http.server` on 127.0.0.1 over the folder's parent and measures
`http://127.0.0.1:PORT/<folder name>` too. The consumption is stage-1 training's sentences/s (default: the
st_training row's `disco_sentences_per_s` in docs/benchmarks.json).
"""

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from ..core.files import REPO_ROOT, write_json_atomic


def _rank(location, rank: int, world_size: int, student: str, batch_size: int, max_length: int) -> tuple:
    import torch

    from ..data.loader import ShardBatches
    from ..data.shards import read_index
    from ..data.token_ids import pad, usable
    from ..models.encoder import Encoder

    torch.set_num_threads(1)
    encoder = Encoder.from_pretrained(student, max_length=max_length)
    index = read_index(location)
    tokenizing = [0.0]

    def collate(texts, _, ids=None):  # the tokeniser's (or padding's) share of the loader's time, timed where it runs
        start = time.perf_counter()
        batch = encoder.tokenize(texts) if ids is None else pad(encoder, ids)
        tokenizing[0] += time.perf_counter() - start
        return batch

    with_ids = usable(index, encoder)
    loader = ShardBatches(index, batch_size, rank, world_size, collate, with_ids=with_ids)
    start, sentences, tokens = time.perf_counter(), 0, 0
    for batch in loader.batches(0):
        sentences += len(batch["keys"])
        tokens += int(batch["attention_mask"].sum())
    return sentences, tokens, time.perf_counter() - start, tokenizing[0], with_ids


def measure(location, ranks: int, student: str, batch_size: int, max_length: int) -> dict:
    """One epoch on `ranks` processes at once: sentences/s of all ranks together (the slowest rank's time)."""
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(ranks) as pool:
        results = pool.starmap(_rank, [(location, r, ranks, student, batch_size, max_length) for r in range(ranks)])
    sentences = sum(r[0] for r in results)
    seconds = max(r[2] for r in results)
    return {
        "source": str(location),
        "token_ids": results[0][4],  # the shards' stored ids padded, not tokenised
        "ranks": ranks,
        "sentences": sentences,
        "tokens": sum(r[1] for r in results),
        "seconds": round(seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "sentences_per_s": round(sentences / seconds, 1),
        "sentences_per_s_per_core": round(sentences / seconds / ranks, 1),  # one thread a rank
        "tokenize_share": round(max(r[3] for r in results) / seconds, 3),
        "tokenize_sentences_per_s_per_core": round(sentences / sum(r[3] for r in results), 1),
    }


class Server:
    """`python -m http.server` over a folder, on a free port of 127.0.0.1, for the length of a `with`."""

    def __init__(self, folder: Path):
        from ..cluster.distributed import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory", str(folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def __enter__(self):
        import urllib.request

        for _ in range(100):
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"http.server did not answer on {self.url}")

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait()


def training_rate() -> float:
    rows = json.loads((REPO_ROOT / "docs" / "benchmarks.json").read_text())["rows"]
    return next(r["detail"]["disco_sentences_per_s"] for r in rows if r["name"] == "st_training")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m disco_dist.bench.loader_rate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--shards", type=Path, required=True, help="a local shard folder")
    parser.add_argument("--serve", action="store_true", help="also through python -m http.server on 127.0.0.1")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--student", default="all-MiniLM-L6-v2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--consumption", type=float, help="training sentences/s (default: docs/benchmarks.json)")
    parser.add_argument("--out", type=Path, help="JSON file for the rows")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    consumption = args.consumption or training_rate()
    rows = [measure(args.shards, args.ranks, args.student, args.batch_size, args.max_length)]
    if args.serve:
        with Server(args.shards.resolve().parent) as server:
            url = f"{server.url}/{args.shards.resolve().name}"
            rows.append(measure(url, args.ranks, args.student, args.batch_size, args.max_length))
    for row in rows:
        row["x_consumption"] = round(row["sentences_per_s"] / consumption, 1)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; training consumes {consumption} sentences/s")
    print(
        f"{'source':<44} {'ranks':>5} {'sentences':>10} {'seconds':>8} {'sentences/s':>12} {'per core':>9} "
        f"{'tokenise share':>14} {'tokenise/core':>13} {'x training':>10} ids"
    )
    for r in rows:
        print(
            f"{r['source'][-44:]:<44} {r['ranks']:>5} {r['sentences']:>10,} {r['seconds']:>8} "
            f"{r['sentences_per_s']:>12,} {r['sentences_per_s_per_core']:>9,} {r['tokenize_share']:>14.0%} "
            f"{r['tokenize_sentences_per_s_per_core']:>13,} {r['x_consumption']:>10} "
            f"{'yes' if r['token_ids'] else 'no'}"
        )
    if args.out:
        write_json_atomic(args.out, {"cpu": cpu_model(), "consumption": consumption, "rows": rows})


if __name__ == "__main__":
    main()
