"""Step metrics: loss terms, throughput and where the time goes, to TensorBoard and a progress line.

Only rank 0 writes. `flush` is collective (every rank calls it at the same step): it averages the
interval's loss terms and sums sentences and tokens over the ranks with one small all-reduce.
"""

import os
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from ..cluster import distributed
from ..core.progress import duration


class Stopwatch:
    """Seconds spent in named parts of the step (teacher, wait, comm) since the last `take`."""

    def __init__(self):
        self.totals = defaultdict(float)

    @contextmanager
    def timing(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - start

    def timed(self, name: str, fn):
        def wrapped(*args, **kwargs):
            with self.timing(name):
                return fn(*args, **kwargs)

        return wrapped

    def wrap_collective(self, obj, method: str, name: str) -> None:
        """Time a collective in two parts: "wait", a barrier first (this rank waiting for the slowest one), then
        `name`, the collective itself (moving the bytes)."""
        call = self.timed(name, getattr(obj, method))

        def waited(*args, **kwargs):
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # this rank's own queued kernels are compute, not waiting (untimed)
            with self.timing("wait"):
                distributed.barrier()
            return call(*args, **kwargs)

        setattr(obj, method, waited)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] += seconds

    def take(self) -> dict:
        out = dict(self.totals)
        self.totals.clear()
        return out


class Metrics:
    def __init__(
        self,
        log_dir,
        progress_total: int,
        progress_start: int = 0,
        show_progress: bool = False,
        peak_flops_per_s: float | None = None,
    ):
        """`peak_flops_per_s`: one device's matmul rate, for an online teacher's MFU (None: no teacher in the run)."""
        self.writer = None
        self.peak = peak_flops_per_s
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
        self.is_main = log_dir is not None
        self.total, self.start_step = progress_total, progress_start
        self.bar = None
        if show_progress:
            from tqdm import tqdm

            self.bar = tqdm(total=progress_total, initial=progress_start, unit="step", dynamic_ncols=True)
        self.terms = defaultdict(float)
        self.counts = {"sentences": 0, "tokens": 0, "steps": 0, "teacher_flops": 0.0}
        self.started = self.interval_start = time.perf_counter()
        self.stopwatch_totals = defaultdict(float)
        self.paused = 0.0

    @contextmanager
    def paused_clock(self):
        """Evaluation and checkpoint time: not part of the training throughput."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - start

    def record(self, terms: dict, sentences: int, tokens: int, stopwatch, teacher_flops: float = 0.0) -> None:
        for name, value in terms.items():
            self.terms[name] += value.detach()  # stays on the device: no host sync per step
        self.counts["sentences"] += sentences
        self.counts["tokens"] += tokens
        self.counts["steps"] += 1
        self.counts["teacher_flops"] += teacher_flops
        for name, seconds in stopwatch.take().items():
            self.stopwatch_totals[name] += seconds
        if self.bar is not None:
            self.bar.update(1)

    def flush(self, step: int, gauges: dict) -> None:
        names = sorted(self.terms)
        steps = max(1, self.counts["steps"])
        values = torch.tensor(
            [float(self.terms[n]) / steps for n in names]
            + [self.counts["sentences"], self.counts["tokens"], self.counts["teacher_flops"]],
            dtype=torch.float64,
        )
        if distributed.world_size() > 1:
            dist.all_reduce(values, group=distributed.host_group())  # host numbers: gloo, also beside NCCL
            values[: len(names)] /= distributed.world_size()
        seconds = max(1e-9, time.perf_counter() - self.interval_start - self.paused)
        scalars = {f"loss/{n}": float(v) for n, v in zip(names, values)}
        scalars["throughput/sentences_per_s"] = float(values[-3]) / seconds
        scalars["throughput/tokens_per_s"] = float(values[-2]) / seconds
        if self.peak:  # the online teacher's forward FLOPs over the interval's wall time, all ranks
            scalars["throughput/teacher_tflops"] = float(values[-1]) / seconds / 1e12
            scalars["throughput/teacher_mfu"] = float(values[-1]) / seconds / (self.peak * distributed.world_size())
        for name in ("teacher", "wait", "comm"):
            scalars[f"time/{name}_share"] = self.stopwatch_totals.get(name, 0.0) / seconds
        scalars.update({(k if "/" in k else f"train/{k}"): v for k, v in gauges.items()})
        if self.is_main:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
            self._report(step, scalars)
        self.terms.clear()
        self.counts = {"sentences": 0, "tokens": 0, "steps": 0, "teacher_flops": 0.0}
        self.stopwatch_totals.clear()
        self.interval_start, self.paused = time.perf_counter(), 0.0

    def _report(self, step: int, scalars: dict) -> None:
        losses = " ".join(f"{k[5:]} {v:.4f}" for k, v in scalars.items() if k.startswith("loss/"))
        rate = scalars["throughput/sentences_per_s"]
        if self.bar is not None:
            self.bar.set_postfix_str(f"{losses} {rate:.0f} sent/s")
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(1, done) * (self.total - step)
        mfu = f" (MFU {scalars['throughput/teacher_mfu']:.1%})" if "throughput/teacher_mfu" in scalars else ""
        print(
            f"step {step}/{self.total}  {losses}  {rate:.1f} sent/s  teacher {scalars['time/teacher_share']:.0%}{mfu}  "
            f"wait {scalars['time/wait_share']:.0%}  comm {scalars['time/comm_share']:.0%}  ETA {duration(eta)}",
            flush=True,
        )

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.is_main:
            self.writer.add_scalar(name, value, step)
            self.writer.flush()
            if self.bar is None:
                print(f"step {step}: {name} = {value:.2f}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


class SampleLog:
    """`--sample-log`: every batch this rank consumed, one line each, `epoch batch step status keys`
    (status: trained, or skipped for a non-finite loss). On resume the lines from the checkpoint's position
    on are dropped (a crashed run may have logged batches whose updates were lost), so a finished run's logs
    hold each consumed batch exactly once: the audit that no sentence was skipped or seen twice."""

    def __init__(self, path, epoch: int, batch: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                fields = line.split("\t")
                if (
                    len(fields) == 5
                    and fields[0].isdigit()
                    and fields[1].isdigit()
                    and (int(fields[0]), int(fields[1])) < (epoch, batch)
                ):
                    kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def write(self, epoch: int, batch: int, step: int, status: str, keys) -> None:
        self._file.write(f"{epoch}\t{batch}\t{step}\t{status}\t{','.join(keys)}\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_sample_logs(run_dir) -> list:
    """(rank, epoch, batch, step, status, keys) of every line of a run's sample logs."""
    rows = []
    for path in sorted((Path(run_dir) / "samples").glob("rank-*.tsv")):
        rank = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            epoch, batch, step, status, keys = line.split("\t")
            rows.append((rank, int(epoch), int(batch), int(step), status, keys.split(",")))
    return rows
