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
  bf16_training        S2 CKD on 2 ranks, bf16 autocast / fp32 (sentences/s), with STS-B dev after the same steps
  time_to_student_min  minutes from nothing to a scored S2 student (`demo.py --recipe S2-fast`), with its STS avg

disco-dist's side runs the user's commands (`python -m disco_dist.cli.commands distill ...`, see
distributed.command_argv), the other side the workers of `disco_dist.bench.measure`.
"""

import json
import shutil
import statistics
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ..cluster.distributed import command_argv, threads_per_rank
from ..core.files import DS_CONFIGS
from ..report.recipes import flags
from .benchmark_rows import TARGETS, Row
from .benchmark_runs import WholeRuns
from .measure import alternate, matmul_rate, rate_after_warmup, run_checked, training_flops_per_sentence, worker_result

# ---------------------------------------------------------------- the benchmark


@dataclass
class Settings:
    student: str = "all-MiniLM-L6-v2"
    teacher: str = "all-mpnet-base-v2"
    corpus: str | None = None  # default: the shared Wikipedia sentences
    teacher_sentences: int = 768  # embedded by both teacher sides; then the training runs' data
    batch_size: int = 64
    teacher_batch_size: int | None = None  # None: the product's default for the device (see teacher.py)
    teacher_token_budget: int | None = None  # teacher_encode's cache pass (None: its default; 0: fixed batches)
    max_length: int = 128
    lr: float = 1e-4
    warmup_steps: int = 5
    steps: int = 20
    ckd_steps: int = 12
    queue_size: int = 65_536
    repeats: int = 3
    st_batch_sizes: tuple = (8, 16, 32, 64, 128, 256)
    ceiling_batch_sizes: tuple = ()  # the plain loop's training batches beside batch_size (ceiling.py)
    device: str = "cpu"
    precision: str = "fp32"
    bf16_steps: int = 200  # bf16_training: steps of each side
    bf16_shards: str | None = None  # teacher-cached shards for bf16_training (required by that part)
    bf16_keep_layers: tuple = (0, 2, 5)  # S2
    mfu_ranks: int = 2  # mfu: the ranks of the row's training run (one per core here; 0: st_training's one process)
    zero3_config: str = str(DS_CONFIGS / "teacher_zero3.json")  # zero3_vs_replicated: the ZeRO-3 side's config
    time_to_student_run: str | None = None  # the finished `demo.py --recipe S2-fast` run that time_to_student_min reads
    parts: tuple = ("st_training", "teacher_encode", "zero3_vs_replicated", "mfu", "loader_headroom", "ckd_overhead")
    work_dir: str = "runs/benchmark"
    command: str = ""


class Benchmark(WholeRuns):
    """The parts of `settings.parts`, each adding its row, run in ORDER. What several parts read is computed
    once, by the first that reads it: `cached` (the teacher-cached shards) and `training` (the two training
    rates, whose measurement adds the st_training row: mfu or loader_headroom without st_training report it
    too, before their own)."""

    ORDER = (
        "teacher_encode",
        "zero3_vs_replicated",
        "st_training",
        "mfu",
        "loader_headroom",
        "ckd_overhead",
        "bf16_training",
        "time_to_student_min",
    )

    def __init__(self, settings: Settings, log=print):
        self.s, self.log = settings, log
        self.work = Path(settings.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.device_name = "cpu" if settings.device == "cpu" else torch.cuda.get_device_name(0)
        self.rows, self.runs = [], 0

    def run(self) -> list:
        self.prepare()
        for part in self.ORDER:
            if part in self.s.parts:
                getattr(self, part)()
        return self.rows

    # -- helpers
    def _spec(self, **extra) -> dict:
        s = self.s
        return {
            "student": s.student,
            "teacher": s.teacher,
            "max_length": s.max_length,
            "batch_size": s.batch_size,
            "lr": s.lr,
            "warmup_steps": s.warmup_steps,
            "steps": s.steps,
            "device": s.device,
            "precision": s.precision,
            "teacher_batch_size": s.teacher_batch_size,
            **extra,
        }

    def _run(self, cmd: list, ranks: int = 0) -> str:
        """Run `cmd`; several ranks split the cores among them."""
        return run_checked(cmd, {"OMP_NUM_THREADS": threads_per_rank(ranks)} if ranks else None)

    def _worker(self, name: str, spec: dict, ranks: int = 0) -> dict:
        return worker_result(name, spec, ranks, self._run)

    def _distill(self, shards: Path, loss: str, steps: int, warmup: int, ranks: int = 0, extra=()) -> float:
        """Sentences/s of a real `distill` run after its warm-up interval."""
        return self._distill_run(shards, loss, steps, warmup, ranks, extra)[0]

    def _distill_run(self, shards: Path, loss: str, steps: int, warmup: int, ranks: int = 0, extra=()) -> tuple:
        """(sentences/s after the warm-up interval, the run's train_summary.json) of a real `distill` run."""
        self.runs += 1
        run_dir = self.work / f"distill-{loss}-{self.runs}"
        args = flags(
            dict(
                shards=shards,
                student=self.s.student,
                run_dir=run_dir,
                loss=loss,
                batch_size=self.s.batch_size,
                max_length=self.s.max_length,
                lr=self.s.lr,
                max_steps=warmup + steps,
                log_every=warmup,
                checkpoint_every=0,
                head_init="random",
                queue_size=self.s.queue_size,
                precision=self.s.precision,
                progress="off",
                teacher_mode="cached",
            )
        )
        args += list(extra)
        self._run(command_argv("distill", *args, ranks=ranks), ranks)
        rate = rate_after_warmup(run_dir)
        summary = json.loads((run_dir / "train_summary.json").read_text())
        shutil.rmtree(run_dir, ignore_errors=True)
        return rate, summary

    def _add(self, name: str, value: float, command: str, **detail) -> None:
        target, better = TARGETS[name]
        row = Row(name, round(value, 4), target, better, self.device_name, command, detail)
        self.rows.append(row)
        self.log(f"{name}: {value:.3f} (target {'>=' if better == 'higher' else '<='} {target}) {detail}")

    # -- the inputs the parts share
    def prepare(self) -> None:
        from ..data.make_shards import make_shards
        from ..data.paths import resolve_data_root

        corpus = self.s.corpus or resolve_data_root(None) / "wiki" / "wiki_en_sentences_100k.txt.gz"
        self.source = self.work / "source"
        make_shards(
            corpus,
            self.source,
            shard_size=max(1, self.s.teacher_sentences // 8),
            limit=self.s.teacher_sentences,
            overwrite=True,
            log=lambda *_: None,
        )

    def cache_pass(self) -> float:
        """The cache pass as a user runs it, one process, into work/cached; its sentences/s (model loading
        excluded). It length-sorts all the sentences together, as `SentenceTransformer.encode` does with its
        input (`--sort-group`): at this size its default would sort groups of 48, at a corpus's scale 4,096."""
        options = dict(
            shards=self.source,
            out=self.work / "cached",
            teacher=self.s.teacher,
            max_length=self.s.max_length,
            overwrite=True,
            teacher_batch_size=self.s.teacher_batch_size,
            teacher_token_budget=self.s.teacher_token_budget,
            sort_group=self.s.teacher_sentences,
            precision=self.s.precision,  # the same as the other side's, never the machine's auto choice
        )
        self._run(command_argv("cache_teacher", *flags(options)))
        return json.loads((self.work / "cached" / "index.json").read_text())["teacher"]["sentences_per_s"]

    @cached_property
    def cached(self) -> Path:
        """The teacher-cached shards the training parts read: one cache pass, made here unless teacher_encode's
        timed passes already wrote them (it then sets this attribute)."""
        self.cache_pass()
        return self.work / "cached"

    @cached_property
    def training(self) -> dict:
        """disco-dist's and sentence-transformers' training sentences/s, measured (and the st_training row
        added) once, for st_training, mfu and loader_headroom alike."""
        summaries = []

        def ours_once():
            rate, summary = self._distill_run(self.cached, "mse", self.s.steps, self.s.warmup_steps)
            summaries.append(summary)
            return rate

        ours, theirs, a, b = alternate(
            ours_once,
            lambda: self._worker("st_training", self._spec(shards=str(self.cached)))["sentences_per_s"],
            self.s.repeats,
        )
        sizes = [self.s.batch_size, *(b for b in self.s.ceiling_batch_sizes if b != self.s.batch_size)]
        ceiling = self._worker("ceiling_train", self._spec(shards=str(self.cached), batch_sizes=sizes))
        ceiling = {k: v and round(v, 2) for k, v in ceiling["sentences_per_s"].items()}
        self._add(
            "st_training",
            ours / theirs,
            self.s.command,
            disco_sentences_per_s=round(ours, 2),
            st_sentences_per_s=round(theirs, 2),
            ceiling_sentences_per_s=ceiling,  # the plain loop at each batch size (None: did not fit)
            x_ceiling=round(ours / ceiling[str(self.s.batch_size)], 3) if ceiling[str(self.s.batch_size)] else None,
            batch_size=self.s.batch_size,
            steps=self.s.steps,
            warmup_steps=self.s.warmup_steps,
            repeats_disco=a,
            repeats_st=b,
            **{k: v for k, v in summaries[-1].items() if k == "peak_gpu_memory_gib"},
        )
        return {"disco": ours, "st": theirs}

    # -- the parts
    def teacher_encode(self) -> None:
        def st_encode(**spec):
            return self._worker("st_encode", self._spec(shards=str(self.source), **spec))["sentences_per_s"]

        best = st_encode(batch_sizes=list(self.s.st_batch_sizes), limit=min(256, self.s.teacher_sentences))
        best_batch = int(max(best, key=best.get))
        ours, theirs, a, b = alternate(
            self.cache_pass, lambda: st_encode(batch_sizes=[best_batch])[str(best_batch)], self.s.repeats
        )
        self.cached = self.work / "cached"  # written by the passes just timed: the training parts reuse it
        cache = json.loads((self.cached / "index.json").read_text())["teacher"]
        spec = self._spec(shards=str(self.source), batch_size=cache["batch_size"])
        ceiling = self._worker("ceiling_encode", spec)["sentences_per_s"]
        self._add(
            "teacher_encode",
            ours / theirs,
            self.s.command,
            disco_sentences_per_s=round(ours, 2),
            ceiling_sentences_per_s=round(ceiling, 2),  # the plain forward at the cache pass's batch size
            x_ceiling=round(ours / ceiling, 3),
            disco_teacher_batch_size=cache["batch_size"],
            disco_token_budget=cache["token_budget"],
            st_sentences_per_s=round(theirs, 2),
            st_best_batch_size=best_batch,
            sentences=self.s.teacher_sentences,
            st_batch_size_sweep={k: round(v, 2) for k, v in best.items()},
            repeats_disco=a,
            repeats_st=b,
        )

    def zero3_vs_replicated(self) -> None:
        from ..models.teacher import default_teacher_batch_size

        config = Path(self.s.zero3_config)
        spec, dtypes = self._spec(shards=str(self.source), ds_config=str(config)), set()

        def side(mode):  # its rate; the dtype it really ran at goes into the row
            result = self._worker("teacher_ranks", {**spec, "mode": mode}, ranks=2)
            dtypes.add(f"{mode} {result['dtype']}")
            return result["sentences_per_s"]

        zero3, replicated, a, b = alternate(lambda: side("zero3"), lambda: side("replicated"), self.s.repeats)
        batch_size = self.s.teacher_batch_size or default_teacher_batch_size(torch.device(self.s.device), True)
        self._add(
            "zero3_vs_replicated",
            zero3 / replicated,
            self.s.command,
            zero3_sentences_per_s=round(zero3, 2),
            replicated_sentences_per_s=round(replicated, 2),
            teacher_batch_size=batch_size,
            zero3_config=config.name,
            dtypes=sorted(dtypes),
            repeats_zero3=a,
            repeats_replicated=b,
        )

    def st_training(self) -> None:
        """Its row is added where the rates are measured (`training`), by whichever part needs them first."""
        self.training  # noqa: B018

    def mfu(self) -> None:
        """FLOPs of the real tokens over the matmul peak, for the one-process run of st_training and, with
        `mfu_ranks`, for the layout `deepspeed launchers/distill.py` trains in on this machine: that many ranks
        side by side (the row's value), against the higher of the one-process rate and that of as many ranks
        timing at once."""
        from transformers import AutoConfig, AutoTokenizer

        from ..data.shards import iter_shard_samples, read_index
        from ..models.encoder import resolve_model_path

        training = self.training
        path = resolve_model_path(self.s.student)
        config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        texts = [t for t, _ in iter_shard_samples(read_index(self.cached))]
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=self.s.max_length)["input_ids"]]
        teacher_dim = json.loads((self.cached / "index.json").read_text())["teacher"]["dim"]
        flops = training_flops_per_sentence(config, lengths, teacher_dim)
        dtype = torch.bfloat16 if self.s.precision == "bf16" else torch.float32
        peak = matmul_rate(torch.device(self.s.device), dtype)
        one, theirs = (training[k] * flops / peak for k in ("disco", "st"))
        value, detail = one, dict(one_process_mfu=round(one, 6), matmul_tflops=round(peak / 1e12, 4))
        if ranks := self.s.mfu_ranks:
            rates = [
                self._distill(self.cached, "mse", self.s.steps, self.s.warmup_steps, ranks)
                for _ in range(self.s.repeats)
            ]
            ranks_peak = self._worker("matmul", self._spec(), ranks)["flops"]
            detail.update(
                ranks=ranks,
                ranks_sentences_per_s=[round(r, 2) for r in rates],
                ranks_matmul_tflops=round(ranks_peak / 1e12, 4),
            )
            # over the higher of the two peaks: the most this machine's cores did at a matmul, either way
            value = statistics.median(rates) * flops / max(peak, ranks_peak)
        self._add(
            "mfu",
            value,
            self.s.command,
            **detail,
            st_mfu=round(theirs, 4),
            precision=self.s.precision,
            gflops_per_sentence=round(flops / 1e9, 3),
            mean_tokens=round(sum(lengths) / len(lengths), 1),
        )

    def loader_headroom(self) -> None:
        from ..data.loader import ShardBatches
        from ..data.shards import read_index
        from ..models.encoder import Encoder

        training = self.training
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
        self._add(
            "loader_headroom",
            rate / training["disco"],
            self.s.command,
            loader_sentences_per_s=round(rate, 1),
            training_sentences_per_s=round(training["disco"], 2),
        )

    def ckd_overhead(self) -> None:
        warmup = max(1, self.s.warmup_steps // 2)
        mse, ckd, a, b = alternate(
            lambda: self._distill(self.cached, "mse", self.s.ckd_steps, warmup, ranks=2),
            # the queue full from step 1: the steady state of a long run
            lambda: self._distill(self.cached, "ckd", self.s.ckd_steps, warmup, ranks=2, extra=["--prefill-queue"]),
            self.s.repeats,
        )
        self._add(
            "ckd_overhead",
            mse / ckd,
            self.s.command,
            mse_sentences_per_s=round(mse, 2),
            ckd_sentences_per_s=round(ckd, 2),
            queue_size=self.s.queue_size,
            ranks=2,
            repeats_mse=a,
            repeats_ckd=b,
        )
