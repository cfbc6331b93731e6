"""Speed, measured as ratios taken side by side on one machine (absolute times drift on shared machines).

Every comparison runs both sides as fresh processes of one process tree, alternating A, B, A, B, ...,
and reports the median of the repeats. The rows (see docs/benchmarks.md):

  st_training          disco-dist stage-1 MSE-KD training (cached teacher) / sentence-transformers'
                       SentenceTransformerTrainer + MSELoss with the same embeddings as labels (sentences/s)
  teacher_encode       the cache pass (one process) / SentenceTransformer.encode at its best batch size
  zero3_vs_replicated  the ZeRO-3 teacher on 2 ranks / the same teacher replicated on 2 ranks
  mfu                  model FLOPs utilisation of a stage-1 step: FLOPs of forward + backward from the model's
                       shapes and the real (non-padding) tokens / (step time x the matmul rate measured here)
  loader_headroom      the streaming loader alone / what training consumes (sentences/s)
  ckd_overhead         step time of CKD (gathered negatives + a full queue) / MSE-KD, on 2 ranks

A worker is this module run as `launchers/benchmark.py --worker NAME --spec JSON`; it prints one JSON line.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import REPO_ROOT
from .distributed import deepspeed_command, threads_per_rank

LAUNCHERS = REPO_ROOT / "launchers"
RESULT_PREFIX = "BENCHMARK_RESULT "


@dataclass
class Row:
    name: str
    value: float
    target: float
    better: str  # "higher" | "lower"
    device: str
    command: str
    detail: dict = field(default_factory=dict)

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.better == "higher" else self.value <= self.target


# ---------------------------------------------------------------- measuring

def matmul_rate(device: torch.device, dtype=torch.float32, size: int = 2048, seconds: float = 2.0) -> float:
    """Dense matmul FLOP/s of this device with the current thread count: the best of timed bursts."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _sync(device)
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = max(best, 4 * 2 * size ** 3 / (time.perf_counter() - t))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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


def run_checked(cmd: list, env: dict | None = None, timeout: int = 3600) -> str:
    """Run a worker or a launcher (argument list, no shell); its stdout, or an error with its stderr's end."""
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def run_json(cmd: list, env: dict | None = None) -> dict:
    """Run a worker and return the JSON it printed after RESULT_PREFIX."""
    lines = [line for line in run_checked(cmd, env).splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... printed no result")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def alternate(side_a, side_b, repeats: int) -> tuple:
    """Call A, B, A, B, ... `repeats` times each; the medians of their results (numbers) and all values."""
    a, b = [], []
    for _ in range(repeats):
        a.append(side_a())
        b.append(side_b())
    return statistics.median(a), statistics.median(b), a, b


# ---------------------------------------------------------------- workers (one process each)

def worker_st_training(spec: dict) -> dict:
    """sentence-transformers' own distillation path: SentenceTransformerTrainer, MSELoss, teacher embeddings
    as labels, the student plus a linear Dense to the teacher's width (what disco-dist's head is)."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    try:
        from sentence_transformers.sentence_transformer.losses import MSELoss
        from sentence_transformers.sentence_transformer.modules import Dense
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MSELoss
        from sentence_transformers.models import Dense

    from .encoder import resolve_model_path
    from .shards import iter_shard_samples, read_index

    torch.manual_seed(0)
    samples = list(iter_shard_samples(read_index(spec["shards"]).paths()))
    model = SentenceTransformer(resolve_model_path(spec["student"]), device=spec["device"])
    model.max_seq_length = spec["max_length"]
    dim = model.get_sentence_embedding_dimension()
    model.append(Dense(dim, len(samples[0][1]), activation_function=torch.nn.Identity()))
    data = Dataset.from_dict({"sentence": [t for t, _ in samples], "label": [e.astype("float32").tolist() for _, e in samples]})

    marks = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _sync(torch.device(spec["device"]))
            marks.append(time.perf_counter())

    steps = spec["warmup_steps"] + spec["steps"]
    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out, per_device_train_batch_size=spec["batch_size"], max_steps=steps, learning_rate=spec["lr"],
            warmup_ratio=0.1, save_strategy="no", report_to="none", logging_steps=10 ** 6, seed=0,
            use_cpu=spec["device"] == "cpu", bf16=spec["precision"] == "bf16", dataloader_drop_last=True)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=MSELoss(model),
                                             callbacks=[StepTimes()])
        trainer.train()
    seconds = marks[-1] - marks[spec["warmup_steps"] - 1]
    return {"sentences_per_s": spec["steps"] * spec["batch_size"] / seconds}


def worker_st_encode(spec: dict) -> dict:
    """SentenceTransformer.encode of the teacher, at each batch size asked for; seconds of the encode alone."""
    from sentence_transformers import SentenceTransformer

    from .encoder import resolve_model_path
    from .shards import iter_shard_samples, read_index

    texts = [t for t, _ in iter_shard_samples(read_index(spec["shards"]).paths())][:spec.get("limit")]
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
    ZeRO-3 partitioned or a whole replica per rank, at the given teacher batch size."""
    from . import distributed
    from .encoder import Encoder
    from .shards import iter_shard_samples, read_index
    from .teacher import ZeroTeacher, default_teacher_batch_size

    env = distributed.init_distributed(spec.get("local_rank", -1))
    # both sides at the ZeRO-3 teacher's default for this device and world size
    batch_size = spec["teacher_batch_size"] or default_teacher_batch_size(env.device, env.world_size > 1)
    texts = [t for t, _ in iter_shard_samples(read_index(spec["shards"]).paths())]
    mine = texts[env.rank::env.world_size]
    if spec["mode"] == "zero3":
        teacher = ZeroTeacher(spec["teacher"], REPO_ROOT / "ds_configs" / "teacher_zero3.json", env.device,
                              batch_size=batch_size, max_length=spec["max_length"])
        embed = teacher.embed
    else:
        encoder = Encoder.from_pretrained(spec["teacher"], max_length=spec["max_length"]).to(env.device)
        embed = lambda chunk: encoder.encode(chunk, batch_size=batch_size)  # noqa: E731
    embed(mine[:8])  # warm-up (and, under ZeRO-3, the same number of forwards on every rank)
    distributed.barrier()
    start = time.perf_counter()
    embed(mine)
    distributed.barrier()
    seconds = time.perf_counter() - start
    return {"sentences_per_s": len(texts[:len(mine) * env.world_size]) / seconds, "batch_size": batch_size}


WORKERS = {"st_training": worker_st_training, "st_encode": worker_st_encode, "teacher_ranks": worker_teacher_ranks}


def worker_main(name: str, spec: dict) -> None:
    result = WORKERS[name](spec)
    if int(os.environ.get("RANK", "0")) == 0:
        print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the benchmark

@dataclass
class Settings:
    student: str = "all-MiniLM-L6-v2"
    teacher: str = "all-mpnet-base-v2"
    corpus: str | None = None  # default: the shared Wikipedia sentences
    teacher_sentences: int = 768  # embedded by both teacher sides; then the training runs' data
    batch_size: int = 64
    teacher_batch_size: int | None = None  # None: the product's default for the device (see teacher.py)
    max_length: int = 128
    lr: float = 1e-4
    warmup_steps: int = 5
    steps: int = 20
    ckd_steps: int = 12
    queue_size: int = 65_536
    repeats: int = 3
    st_batch_sizes: tuple = (8, 16, 32, 64, 128, 256)
    device: str = "cpu"
    precision: str = "fp32"
    parts: tuple = ("st_training", "teacher_encode", "zero3_vs_replicated", "mfu", "loader_headroom", "ckd_overhead")
    work_dir: str = "runs/benchmark"
    command: str = ""


TARGETS = {"st_training": (1.3, "higher"), "teacher_encode": (1.0, "higher"), "zero3_vs_replicated": (0.8, "higher"),
           "mfu": (0.45, "higher"), "loader_headroom": (20.0, "higher"), "ckd_overhead": (1.10, "lower")}


class Benchmark:
    def __init__(self, settings: Settings, log=print):
        self.s, self.log = settings, log
        self.work = Path(settings.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.device_name = "cpu" if settings.device == "cpu" else torch.cuda.get_device_name(0)
        self.python = sys.executable
        self.rows, self.runs = [], 0

    # -- helpers
    def _spec(self, **extra) -> dict:
        s = self.s
        return {"student": s.student, "teacher": s.teacher, "max_length": s.max_length, "batch_size": s.batch_size,
                "lr": s.lr, "warmup_steps": s.warmup_steps, "steps": s.steps, "device": s.device,
                "precision": s.precision, "teacher_batch_size": s.teacher_batch_size, **extra}

    def _worker(self, name: str, spec: dict, ranks: int = 0) -> dict:
        script = [str(LAUNCHERS / "benchmark.py"), "--worker", name, "--spec", json.dumps(spec)]
        if ranks:
            return run_json(deepspeed_command(ranks, *script), env={"OMP_NUM_THREADS": threads_per_rank(ranks)})
        return run_json([self.python, *script])

    def _distill(self, shards: Path, loss: str, steps: int, warmup: int, ranks: int = 0, env=None) -> float:
        """Sentences/s of a real `distill.py` run after its warm-up interval."""
        self.runs += 1
        run_dir = self.work / f"distill-{loss}-{self.runs}"
        args = ["--shards", shards, "--student", self.s.student, "--run-dir", run_dir, "--loss", loss,
                "--batch-size", self.s.batch_size, "--max-length", self.s.max_length, "--lr", self.s.lr,
                "--max-steps", warmup + steps, "--log-every", warmup, "--checkpoint-every", 0, "--head-init", "random",
                "--queue-size", self.s.queue_size, "--precision", self.s.precision, "--progress", "off",
                "--teacher-mode", "cached"]
        if ranks:
            cmd = deepspeed_command(ranks, LAUNCHERS / "distill.py", *args)
            env = {"OMP_NUM_THREADS": threads_per_rank(ranks), **(env or {})}
        else:
            cmd = [self.python, LAUNCHERS / "distill.py", *args]
        run_checked(cmd, env)
        rate = rate_after_warmup(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        return rate

    def _add(self, name: str, value: float, command: str, **detail) -> None:
        target, better = TARGETS[name]
        row = Row(name, round(value, 4), target, better, self.device_name, command, detail)
        self.rows.append(row)
        self.log(f"{name}: {value:.3f} (target {'>=' if better == 'higher' else '<='} {target}) {detail}")

    # -- the inputs every part shares
    def prepare(self) -> None:
        from .data import resolve_data_root
        from .shards import make_shards

        corpus = self.s.corpus or resolve_data_root(None) / "wiki" / "wiki_en_sentences_100k.txt.gz"
        self.source = self.work / "source"
        make_shards(corpus, self.source, shard_size=max(1, self.s.teacher_sentences // 8), limit=self.s.teacher_sentences,
                    overwrite=True, log=lambda *_: None)

    def cache_pass(self) -> float:
        """The cache pass as a user runs it, one process; its sentences/s (model loading excluded)."""
        out = self.work / "cached"
        cmd = [self.python, LAUNCHERS / "cache_teacher.py", "--shards", self.source, "--out", out, "--teacher",
               self.s.teacher, "--max-length", self.s.max_length, "--overwrite",
               *(["--teacher-batch-size", self.s.teacher_batch_size] if self.s.teacher_batch_size else [])]
        run_checked(cmd)
        self.cached = out
        return json.loads((out / "index.json").read_text())["teacher"]["sentences_per_s"]

    # -- the parts
    def teacher_encode(self) -> None:
        best = self._worker("st_encode", self._spec(shards=str(self.source), batch_sizes=list(self.s.st_batch_sizes),
                                                    limit=min(256, self.s.teacher_sentences)))["sentences_per_s"]
        best_batch = int(max(best, key=best.get))
        ours, theirs, a, b = alternate(
            self.cache_pass,
            lambda: self._worker("st_encode", self._spec(shards=str(self.source), batch_sizes=[best_batch]))["sentences_per_s"][str(best_batch)],
            self.s.repeats)
        cache_batch = json.loads((self.cached / "index.json").read_text())["teacher"]["batch_size"]
        self._add("teacher_encode", ours / theirs, self.s.command, disco_sentences_per_s=round(ours, 2),
                  disco_teacher_batch_size=cache_batch,
                  st_sentences_per_s=round(theirs, 2), st_best_batch_size=best_batch, sentences=self.s.teacher_sentences,
                  st_batch_size_sweep={k: round(v, 2) for k, v in best.items()}, repeats_disco=a, repeats_st=b)

    def ensure_cached(self) -> None:
        if not hasattr(self, "cached"):
            self.cache_pass()

    def zero3_vs_replicated(self) -> None:
        from .teacher import default_teacher_batch_size

        spec = self._spec(shards=str(self.source))
        zero3, replicated, a, b = alternate(lambda: self._worker("teacher_ranks", {**spec, "mode": "zero3"}, ranks=2)["sentences_per_s"],
                                            lambda: self._worker("teacher_ranks", {**spec, "mode": "replicated"}, ranks=2)["sentences_per_s"],
                                            self.s.repeats)
        self._add("zero3_vs_replicated", zero3 / replicated, self.s.command, zero3_sentences_per_s=round(zero3, 2),
                  replicated_sentences_per_s=round(replicated, 2),
                  teacher_batch_size=self.s.teacher_batch_size or default_teacher_batch_size(torch.device(self.s.device), True),
                  repeats_zero3=a, repeats_replicated=b)

    def st_training(self) -> None:
        self.ensure_cached()
        ours, theirs, a, b = alternate(
            lambda: self._distill(self.cached, "mse", self.s.steps, self.s.warmup_steps),
            lambda: self._worker("st_training", self._spec(shards=str(self.cached)))["sentences_per_s"],
            self.s.repeats)
        self.training = {"disco": ours, "st": theirs}
        self._add("st_training", ours / theirs, self.s.command, disco_sentences_per_s=round(ours, 2),
                  st_sentences_per_s=round(theirs, 2), batch_size=self.s.batch_size, steps=self.s.steps,
                  warmup_steps=self.s.warmup_steps, repeats_disco=a, repeats_st=b)

    def mfu(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from .encoder import resolve_model_path
        from .shards import iter_shard_samples, read_index

        if not hasattr(self, "training"):
            self.st_training()
        path = resolve_model_path(self.s.student)
        config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        texts = [t for t, _ in iter_shard_samples(read_index(self.cached).paths())]
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=self.s.max_length)["input_ids"]]
        teacher_dim = json.loads((self.cached / "index.json").read_text())["teacher"]["dim"]
        flops = training_flops_per_sentence(config, lengths, teacher_dim)
        dtype = torch.bfloat16 if self.s.precision == "bf16" else torch.float32
        peak = matmul_rate(torch.device(self.s.device), dtype)
        ours, theirs = (self.training[k] * flops / peak for k in ("disco", "st"))
        self._add("mfu", ours, self.s.command, st_mfu=round(theirs, 4), matmul_tflops=round(peak / 1e12, 4),
                  gflops_per_sentence=round(flops / 1e9, 3), mean_tokens=round(sum(lengths) / len(lengths), 1))

    def loader_headroom(self) -> None:
        from .encoder import Encoder
        from .loader import ShardBatches
        from .shards import read_index

        if not hasattr(self, "training"):
            self.st_training()
        tokenizer = Encoder.from_pretrained(self.s.student, max_length=self.s.max_length)

        def collate(texts, teacher):
            return {**tokenizer.tokenize(texts), "teacher": teacher}

        loader = ShardBatches(read_index(self.cached), self.s.batch_size, 0, 1, collate, seed=0)
        rates = []
        for epoch in range(self.s.repeats):
            start, sentences = time.perf_counter(), 0
            for batch in loader.batches(epoch):
                sentences += len(batch["keys"])
            rates.append(sentences / (time.perf_counter() - start))
        rate = statistics.median(rates)
        self._add("loader_headroom", rate / self.training["disco"], self.s.command, loader_sentences_per_s=round(rate, 1),
                  training_sentences_per_s=round(self.training["disco"], 2))

    def ckd_overhead(self) -> None:
        self.ensure_cached()
        fill = {"DISCO_BENCH_FILL_QUEUE": "1"}  # the queue full from step 1: the steady state of a long run
        warmup = max(1, self.s.warmup_steps // 2)
        mse, ckd, a, b = alternate(lambda: self._distill(self.cached, "mse", self.s.ckd_steps, warmup, ranks=2),
                                   lambda: self._distill(self.cached, "ckd", self.s.ckd_steps, warmup, ranks=2, env=fill),
                                   self.s.repeats)
        self._add("ckd_overhead", mse / ckd, self.s.command, mse_sentences_per_s=round(mse, 2),
                  ckd_sentences_per_s=round(ckd, 2), queue_size=self.s.queue_size, ranks=2,
                  repeats_mse=a, repeats_ckd=b)

    def run(self) -> list:
        self.prepare()
        for part in ("teacher_encode", "zero3_vs_replicated", "st_training", "mfu", "loader_headroom", "ckd_overhead"):
            if part in self.s.parts:
                getattr(self, part)()
        return self.rows


def format_table(rows: list) -> str:
    lines = ["| name | value | target | met | device |", "|---|---|---|---|---|"]
    for row in rows:
        sign = ">=" if row.better == "higher" else "<="
        lines.append(f"| {row.name} | {row.value:.3f} | {sign} {row.target} | {'yes' if row.met else 'NO'} | {row.device} |")
    return "\n".join(lines)


def merge_json(path: Path, rows: list) -> None:
    """Write the rows into `path`, replacing earlier rows of the same name and device (other devices stay)."""
    from .evaluate import write_json_atomic

    path = Path(path)
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    new = [{k: v for k, v in asdict(r).items()} for r in rows]
    keys = {(r["name"], r["device"]) for r in new}
    write_json_atomic(path, {"rows": [r for r in old if (r["name"], r["device"]) not in keys] + new})
