"""What a rank holds: peak memory of a teacher while it loads and while it embeds, plain (1 rank) or under ZeRO-3.

A sampler thread reads `/proc/self/smaps_rollup` every few milliseconds and keeps the peaks of three sizes:
USS (private pages: what the process alone holds), PSS (its share of every page it maps) and RSS. Each rank
reports its peaks for three phases: `base` (imports and the process group), `load` (the teacher built,
partitioned under ZeRO-3) and `embed` (repeated forwards). On a GPU, `torch.cuda.max_memory_allocated` too.

    python -m disco_dist.bench.memory --teacher FOLDER --ranks 1 2      # the table (docs/benchmarks.md)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

FIELDS = {"Rss": "rss", "Pss": "pss", "Private_Clean": "uss", "Private_Dirty": "uss"}


def smaps_rollup(pid: int | str = "self") -> dict:
    """{"rss", "pss", "uss"} of a process in MiB, from /proc/<pid>/smaps_rollup."""
    out = {"rss": 0.0, "pss": 0.0, "uss": 0.0}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in FIELDS:
                out[FIELDS[name]] += int(rest.split()[0]) / 1024
    return out


class PeakSampler:
    """Peaks of smaps_rollup's sizes over a phase, sampled by a thread every `interval` seconds."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, smaps_rollup(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            now = smaps_rollup()
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = smaps_rollup()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        now = smaps_rollup()
        self.peak = {k: round(max(v, now[k]), 1) for k, v in self.peak.items()}


def random_decoder(
    folder: Path,
    words: list,
    hidden=64,
    layers=2,
    seed=0,
    padding_side="left",
    prompt="Instruct: find sentences that mean the same\nQuery: ",
    max_length=24,
    intermediate=None,
    heads=4,
    vocab_size=None,
) -> Path:
    """A random Qwen3 decoder embedder saved as a sentence-transformers folder, as Qwen3-Embedding ships: a
    word-level tokenizer over `words` that appends the end-of-text token, padding on `padding_side`, last-token
    pooling, normalised, and a default query prompt. `vocab_size` (default: the words) makes the embedding
    table as large as a real model's; the tests use tiny models, the memory measurement one of hundreds of MB."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    from ..core.files import write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    words = ["<pad>", "<unk>", "<eos>", *dict.fromkeys([*words, *"instruct : find sentences mean same query".split()])]
    vocab = {word: i for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
        padding_side=padding_side,
        model_max_length=64,
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=max(vocab_size or 0, len(vocab)),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden // heads,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=2,
    )
    Qwen3Model(config).save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    write_json_atomic(folder / "modules.json", modules)
    write_json_atomic(
        folder / "1_Pooling" / "config.json",
        {"embedding_dimension": hidden, "pooling_mode": "lasttoken", "include_prompt": True},
    )
    write_json_atomic(folder / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
    write_json_atomic(
        folder / "config_sentence_transformers.json",
        {"prompts": {"query": prompt, "document": ""}, "default_prompt_name": "query", "similarity_fn_name": "cosine"},
    )
    (folder / "2_Normalize").mkdir(exist_ok=True)
    return folder


def measured_teacher(folder: Path, layers: int) -> Path:
    """The random decoder of the memory table and test: Qwen3 with hidden 1024, MLP 3072, 16 heads, 32,000 tokens;
    12 layers: 184M parameters (701 MiB fp32), 40 layers: 537M (2,045 MiB)."""
    words = "the old man said that a new film was good dog plays in park".split()
    return random_decoder(
        folder, words, hidden=1024, layers=layers, intermediate=3072, heads=16, vocab_size=32000, max_length=128
    )


def worker_precision(requested: str, device) -> str:
    """--precision: `device` (the default) is bf16 on a GPU, as training and the cache pass hold a teacher there, and
    fp32 on a CPU, as the measured CPU table was taken."""
    if requested != "device":
        return requested
    return "bf16" if device.type == "cuda" else "fp32"


def worker(
    teacher: str, ds_config: str, sentences: int, batch_size: int, forwards: int, precision: str = "device"
) -> dict:
    """One rank: the peaks of each phase, and the share of the teacher's parameters it holds."""
    from ..cluster import distributed
    from ..models.partitioned import held_and_total
    from ..models.teacher import TeacherSettings, ZeroTeacher

    env = distributed.init_distributed()
    texts = [" ".join(["the old man said that the new film was good"] * (1 + i % 4)) for i in range(sentences)]
    distributed.barrier()
    phases = {"base": smaps_rollup()}
    with PeakSampler() as load:
        precision = worker_precision(precision, env.device)
        model = ZeroTeacher(TeacherSettings(teacher, ds_config, batch_size=batch_size, precision=precision), env.device)
        distributed.barrier()
    phases["load"] = load.peak
    phases["after_load"] = smaps_rollup()
    start = time.perf_counter()
    with PeakSampler() as embed:
        for _ in range(forwards):
            model.embed(texts)
        distributed.barrier()
    phases["embed"] = embed.peak
    phases["embed_seconds"] = round(time.perf_counter() - start, 2)
    if env.device.type == "cuda":
        phases["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    weights = held_and_total(model.encoder.model)[1] * (2 if precision == "bf16" else 4)
    return {
        "rank": env.rank,
        "world_size": env.world_size,
        "fraction": model.local_parameter_fraction(),
        "precision": precision,
        "weights_mib": weights / 2**20,
        **phases,
    }


def measure(
    teacher: str,
    ds_config: str,
    ranks: int,
    sentences: int = 64,
    batch_size: int = 16,
    forwards: int = 3,
    precision: str = "device",
) -> list:
    """Run the worker on `ranks` ranks (one plain process for 1) and return every rank's report."""
    from ..cluster.distributed import module_argv, threads_per_rank
    from ..core.errors import UserError
    from ..report.recipes import flags

    # each rank writes its report to its own file: ranks sharing the launcher's stdout can cut into each other's lines
    with tempfile.TemporaryDirectory(prefix="disco-memory-") as folder:
        options = dict(
            worker=folder,
            teacher=teacher,
            ds_config=ds_config,
            sentences=sentences,
            batch_size=batch_size,
            forwards=forwards,
            precision=precision,
        )
        cmd = module_argv("disco_dist.bench.memory", *flags(options), ranks=ranks if ranks > 1 else 0)
        env = {**os.environ, "OMP_NUM_THREADS": threads_per_rank(ranks), "TOKENIZERS_PARALLELISM": "false"}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            if errors:  # the worker's own one line (a bad folder or config)
                raise UserError(f"memory worker on {ranks} rank(s): {errors[-1][len('error: ') :]}")
            raise RuntimeError(f"memory worker on {ranks} rank(s) failed:\n{result.stderr[-3000:]}")
        reports = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("rank-*.json"))]
    if len(reports) != ranks:
        raise RuntimeError(f"memory worker on {ranks} rank(s) wrote {len(reports)} report(s):\n{result.stderr[-3000:]}")
    return sorted(reports, key=lambda r: r["rank"])


def table(reports: dict) -> str:
    """reports: {ranks: [per-rank report]}; every rank's peaks per phase, in MiB, and its embedding seconds."""
    lines = [
        "| ranks | weights MiB | rank | share | base USS | load peak USS / PSS | after load USS | "
        "embed peak USS / PSS | embed s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ranks, per_rank in reports.items():
        for r in per_rank:
            lines.append(
                f"| {ranks} | {r['weights_mib']:.0f} | {r['rank']} | {r['fraction']:.2f} | "
                f"{r['base']['uss']:.0f} | {r['load']['uss']:.0f} / {r['load']['pss']:.0f} | "
                f"{r['after_load']['uss']:.0f} | {r['embed']['uss']:.0f} / {r['embed']['pss']:.0f} | "
                f"{r['embed_seconds']} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    from ..cli.config import Parser, add_local_rank
    from ..core.files import DS_CONFIGS

    parser = Parser(prog="python -m disco_dist.bench.memory", description=__doc__)
    parser.add_argument("--teacher", required=True, help="teacher folder (with --make-teacher: made there if absent)")
    parser.add_argument(
        "--make-teacher",
        action="store_true",
        help="a random Qwen3 (hidden 1024, 32,000 tokens; 12 layers: 184M parameters, 701 MiB fp32) as the "
        "teacher, made once",
    )
    parser.add_argument("--layers", type=int, default=12, help="with --make-teacher: its layers (40: 2,045 MiB)")
    parser.add_argument("--ds-config", default=str(DS_CONFIGS / "teacher_zero3.json"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--forwards", type=int, default=3)
    parser.add_argument(
        "--precision",
        choices=("device", "fp32", "bf16"),
        default="device",
        help="the teacher's weights: device (default) = bf16 on a GPU, fp32 on a CPU",
    )
    parser.add_argument("--out", type=Path, help="JSON file for the reports")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a rank: the folder for its report
    add_local_rank(parser)
    args = parser.parse_args(argv)
    if args.worker:
        from ..core.files import write_json_atomic

        report = worker(args.teacher, args.ds_config, args.sentences, args.batch_size, args.forwards, args.precision)
        write_json_atomic(args.worker / f"rank-{report['rank']}.json", report)
        return
    if args.make_teacher and not (Path(args.teacher) / "config.json").exists():
        measured_teacher(Path(args.teacher), args.layers)
    reports = {
        n: measure(args.teacher, args.ds_config, n, args.sentences, args.batch_size, args.forwards, args.precision)
        for n in args.ranks
    }
    print(table(reports))
    if args.out:
        from ..core.files import write_json_atomic

        write_json_atomic(args.out, {str(k): v for k, v in reports.items()})


if __name__ == "__main__":
    from ..cluster.distributed import exit_process
    from ..core.errors import exit_on_user_error

    exit_on_user_error(main)(sys.argv[1:])
    exit_process(0)
