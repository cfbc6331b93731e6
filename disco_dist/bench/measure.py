"""What the benchmark measures and how: worker processes (started, and what they report), device timing,
FLOP counts, training rates from TensorBoard, and a recipe's encoding speed against its teacher.

A worker is started as `python -m disco_dist.bench.measure NAME SPEC_JSON`; the ranks of
`worker_teacher_ranks` as that module under `deepspeed --module` (LOCAL_RANK in the environment, or
`--local_rank N` among the arguments). Rank 0 writes the result as JSON to the spec's `result_file` (a file, not a
printed line: ranks share the launcher's stdout and can cut into each other's writes).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..cluster.distributed import module_argv
from ..core.files import REPO_ROOT
from ..models.flops import matmul_rate
from .ceiling import worker_ceiling_encode, worker_ceiling_train

# ---------------------------------------------------------------- timing on a device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- workers (one process each)


def worker_st_training(spec: dict) -> dict:
    """sentence-transformers' own distillation path: SentenceTransformerTrainer, MSELoss, teacher embeddings
    as labels, the student plus a linear Dense to the teacher's width (what disco-dist's head is)."""
    import tempfile

    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from transformers import TrainerCallback

    try:
        from sentence_transformers.sentence_transformer.losses import MSELoss
        from sentence_transformers.sentence_transformer.modules import Dense
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MSELoss
        from sentence_transformers.models import Dense

    from ..data.shards import iter_shard_samples, read_index
    from ..models.encoder import resolve_model_path

    torch.manual_seed(0)
    samples = list(iter_shard_samples(read_index(spec["shards"])))
    model = SentenceTransformer(resolve_model_path(spec["student"]), device=spec["device"])
    model.max_seq_length = spec["max_length"]
    dim = model.get_sentence_embedding_dimension()
    model.append(Dense(dim, len(samples[0][1]), activation_function=torch.nn.Identity()))
    data = Dataset.from_dict(
        {"sentence": [t for t, _ in samples], "label": [e.astype("float32").tolist() for _, e in samples]}
    )

    marks = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _sync(torch.device(spec["device"]))
            marks.append(time.perf_counter())

    steps = spec["warmup_steps"] + spec["steps"]
    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out,
            per_device_train_batch_size=spec["batch_size"],
            max_steps=steps,
            learning_rate=spec["lr"],
            warmup_ratio=0.1,
            save_strategy="no",
            report_to="none",
            logging_steps=10**6,
            seed=0,
            use_cpu=spec["device"] == "cpu",
            bf16=spec["precision"] == "bf16",
            dataloader_drop_last=True,
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=data, loss=MSELoss(model), callbacks=[StepTimes()]
        )
        trainer.train()
    seconds = marks[-1] - marks[spec["warmup_steps"] - 1]
    return {"sentences_per_s": spec["steps"] * spec["batch_size"] / seconds}


def worker_st_encode(spec: dict) -> dict:
    """SentenceTransformer.encode of the teacher, at each batch size asked for; seconds of the encode alone."""
    from sentence_transformers import SentenceTransformer

    from ..data.shards import iter_shard_samples, read_index
    from ..models.encoder import resolve_model_path

    texts = [t for t, _ in iter_shard_samples(read_index(spec["shards"]))][: spec.get("limit")]
    model = SentenceTransformer(resolve_model_path(spec["teacher"]), device=spec["device"])
    model.max_seq_length = spec["max_length"]
    if spec["precision"] == "bf16":
        model = model.to(torch.bfloat16)
    model.encode(texts[:8], batch_size=8)  # warm-up
    rates = {}
    for batch_size in spec["batch_sizes"]:
        _sync(torch.device(spec["device"]))
        start = time.perf_counter()
        model.encode(texts, batch_size=batch_size, convert_to_tensor=True)
        _sync(torch.device(spec["device"]))
        rates[batch_size] = len(texts) / (time.perf_counter() - start)
    return {"sentences_per_s": rates}


def worker_teacher_ranks(spec: dict) -> dict:
    """Under `deepspeed --num_gpus 2`: every rank embeds its half of the sentences with the teacher, either
    ZeRO-3 partitioned (under `spec["ds_config"]`) or a whole replica per rank, at the given teacher batch size
    and the same precision on both sides."""
    from ..cluster import distributed
    from ..data.shards import iter_shard_samples, read_index
    from ..models.encoder import Encoder
    from ..models.teacher import TeacherSettings, ZeroTeacher, default_teacher_batch_size

    env = distributed.init_distributed(spec.get("local_rank", -1))
    # both sides at the ZeRO-3 teacher's default for this device and world size
    batch_size = spec["teacher_batch_size"] or default_teacher_batch_size(env.device, env.world_size > 1)
    texts = [t for t, _ in iter_shard_samples(read_index(spec["shards"]))]
    mine = texts[env.rank :: env.world_size]
    if spec["mode"] == "zero3":
        settings = TeacherSettings(
            spec["teacher"],
            spec["ds_config"],
            batch_size=batch_size,
            max_length=spec["max_length"],
            precision=spec["precision"],
        )
        teacher = ZeroTeacher(settings, env.device)
        model, embed = teacher.encoder.model, teacher.embed
    else:
        dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
        encoder = Encoder.from_pretrained(spec["teacher"], max_length=spec["max_length"]).to(env.device, dtype)
        model, embed = encoder.model, lambda chunk: encoder.encode(chunk, batch_size=batch_size)
    embed(mine[:8])  # warm-up (and, under ZeRO-3, the same number of forwards on every rank)
    distributed.barrier()
    start = time.perf_counter()
    embed(mine)
    distributed.barrier()
    seconds = time.perf_counter() - start
    return {
        "sentences_per_s": len(texts[: len(mine) * env.world_size]) / seconds,
        "batch_size": batch_size,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),  # what the side really ran at, for the row
    }


def worker_matmul(spec: dict) -> dict:
    """Under `deepspeed --num_gpus R`: every rank times dense matmuls at the same time, on its share of the
    cores; their summed FLOP/s, the peak that R ranks training side by side can reach."""
    from ..cluster import distributed

    env = distributed.init_distributed(spec.get("local_rank", -1))
    distributed.barrier()
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    rate = torch.tensor([matmul_rate(env.device, dtype)], dtype=torch.float64, device=env.device)
    torch.distributed.all_reduce(rate)
    return {"flops": rate.item(), "ranks": env.world_size}


WORKERS = {
    "ceiling_train": worker_ceiling_train,
    "ceiling_encode": worker_ceiling_encode,
    "st_training": worker_st_training,
    "st_encode": worker_st_encode,
    "teacher_ranks": worker_teacher_ranks,
    "matmul": worker_matmul,
}


def worker_main(name: str, spec: dict) -> None:
    from ..core.files import write_json_atomic

    result = WORKERS[name](spec)
    if int(os.environ.get("RANK", "0")) == 0:
        write_json_atomic(spec["result_file"], result)


# ---------------------------------------------------------------- processes and what they report


def worker_argv(name: str, spec: dict, ranks: int = 0) -> list[str]:
    """The argv of a worker of this module: one process, or `ranks` ranks under the deepspeed
    launcher, which runs it as a module (`--module`; each rank finds LOCAL_RANK in its environment)."""
    return module_argv(__name__, name, json.dumps(spec), ranks=ranks)


def run_checked(cmd: list, env: dict | None = None, timeout: int = 3600) -> str:
    """Run a worker or a command (argument list, no shell); its stdout, or an error with its stderr's end."""
    result = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def worker_result(name: str, spec: dict, ranks: int, run) -> dict:
    """What worker `name` reports: its argv (on `ranks` ranks, one process for 0) handed to `run(argv, ranks)`,
    then the result file its rank 0 wrote."""
    with tempfile.TemporaryDirectory(prefix="disco-measure-") as folder:
        result_file = Path(folder) / "result.json"
        run(worker_argv(name, {**spec, "result_file": str(result_file)}, ranks), ranks)
        if not result_file.exists():
            raise RuntimeError(f"worker {name} wrote no result")
        return json.loads(result_file.read_text())


def alternate(side_a, side_b, repeats: int) -> tuple:
    """Call A, B, A, B, ... `repeats` times each; the medians of their results (numbers) and all values."""
    a, b = [], []
    for _ in range(repeats):
        a.append(side_a())
        b.append(side_b())
    return statistics.median(a), statistics.median(b), a, b


def training_flops_per_sentence(config, lengths: list, head_out: int | None) -> float:
    """Forward + backward (3x forward) FLOPs of a BERT-style encoder per sentence, averaged over `lengths`
    (real tokens): per layer and token 2*(4h^2 + 2hi) for the projections and feed-forward, plus 4*L*h for
    attention scores and their weighted sum; plus the projection head."""
    h, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_sentence = [layers * (2 * (4 * h * h + 2 * h * inner) * n + 4 * n * n * h) for n in lengths]
    forward = sum(per_sentence) / len(per_sentence) + (2 * h * head_out if head_out else 0)
    return 3 * forward


def rate_after_warmup(run_dir: Path) -> float:
    """Sentences/s of a training run over its TensorBoard intervals after the first (the warm-up): every
    interval holds the same number of sentences, so the overall rate is the harmonic mean."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    rates = [e.value for e in sorted(events.Scalars("throughput/sentences_per_s"), key=lambda e: e.step)][1:]
    if not rates:
        raise RuntimeError(f"{run_dir}: fewer than two logged intervals")
    return len(rates) / sum(1 / r for r in rates)


# ---------------------------------------------------------------- a recipe's encoding speed (docs/results.md)


def encode_speed(
    recipe: dict, teacher: str, texts: list, batch_sizes=(1, 128), repeats: int = 3, max_length: int = 128
) -> list:
    """Sentences/s of the student and the teacher encoding the same sentences at the same max length, one
    process, alternating the two, medians of `repeats`: the speed column of the results table."""
    from ..models.encoder import Encoder

    student = Encoder.from_pretrained(recipe["student"], max_length=max_length, keep=recipe.get("keep_layers"))
    big = Encoder.from_pretrained(teacher, max_length=max_length)
    rows = []
    for batch_size in batch_sizes:
        sample = texts[: max(64, 4 * batch_size)] if batch_size > 1 else texts[:64]
        rates = {"student": [], "teacher": []}
        for model in (student, big):
            model.encode(sample[:batch_size], batch_size=batch_size)  # warm-up
        for _ in range(repeats):
            for name, model in (("student", student), ("teacher", big)):
                start = time.perf_counter()
                with torch.inference_mode():
                    model.encode(sample, batch_size=batch_size)
                rates[name].append(len(sample) / (time.perf_counter() - start))
        s, t = statistics.median(rates["student"]), statistics.median(rates["teacher"])
        rows.append(
            {
                "student": recipe["label"],
                "batch_size": batch_size,
                "sentences": len(sample),
                "max_length": max_length,
                "student_sentences_per_s": round(s, 2),
                "teacher_sentences_per_s": round(t, 2),
                "speedup": round(s / t, 2),
            }
        )
    return rows


def record_encode_speed(recipe: dict, teacher: str, results_path: Path, command: str, log=print) -> list:
    """encode_speed on the unique sentences of STS-B test, each row marked with `command`, logged and merged
    into the results file's speed rows; the rows."""
    from ..data.sts import read_sts_task
    from ..report.results import merge_speed_rows

    pairs = read_sts_task("STSBenchmark", split="test")
    rows = encode_speed(recipe, teacher, list(dict.fromkeys(pairs.sentences1 + pairs.sentences2)))
    for row in rows:
        row["command"] = command
        log(
            f"{row['student']} batch {row['batch_size']}: {row['student_sentences_per_s']} vs teacher "
            f"{row['teacher_sentences_per_s']} sentences/s ({row['speedup']}x)"
        )
    merge_speed_rows(results_path, rows)
    return rows


def main(argv: list) -> None:
    """`NAME SPEC_JSON`, with deepspeed's `--local_rank=N` (or `--local-rank N`) anywhere among them."""
    from ..cli.config import Parser, add_local_rank

    parser = Parser(
        prog="python -m disco_dist.bench.measure",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=list(WORKERS))
    parser.add_argument("spec", help="the worker's settings as a JSON object (see disco_dist.bench.benchmark)")
    add_local_rank(parser)
    args = parser.parse_args(argv)
    worker_main(args.name, {**json.loads(args.spec), "local_rank": args.local_rank})


if __name__ == "__main__":
    from ..cluster.distributed import exit_process
    from ..core.errors import exit_on_user_error

    exit_on_user_error(main)(sys.argv[1:])
    exit_process(0)  # the result is printed: skip the interpreter teardown (see disco_dist.cluster.distributed)
