"""The training loop both stages share.

Read `train` top to bottom: set up ranks, build the stage (student, data, teacher, loss; see stages.py), wrap
the student in a DeepSpeed engine, resume if asked, then step: loss -> backward -> step, and at a boundary
log -> evaluate -> checkpoint, and finally save the student. Between boundaries the host never waits for the
device: a non-finite loss skips its update on the device, and the host reads that verdict a step later.
What keeps the loop alive (NaN skipping, pre-emption, lost peers) is in resilience.py; the optimizer and
schedule in optim.py; checkpoints in checkpoint.py.
"""

import json
import math
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..cluster import distributed
from ..cluster.ds_config import load_ds_config
from ..cluster.peer_watch import PeerWatch
from ..cluster.resilience import (
    InjectedFaults,
    Preempted,
    PreemptionSignal,
    Verdict,
    check_writable,
    nonfinite_anywhere,
    skip_update_if,
)
from ..core.errors import UserError
from ..core.files import write_json_atomic
from ..core.profiling import WindowProfiler
from ..evaluation.evaluate import stsb_dev_spearman
from ..models.precision import Precision, resolve_precision
from ..report.model_card import write_model_card
from .checkpoint import load_checkpoint, resolve_resume, resume_hint, save_checkpoint
from .metrics import Metrics, SampleLog, Stopwatch
from .optim import build_optimizer
from .settings import RunSettings, TrainSettings


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint (trainer_state.json) and restored on resume."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch: int = 0  # batches of this epoch consumed (trained or skipped)
    best_dev: float | None = None  # best STS-B dev Spearman so far (with --select best)
    total_steps: int = 0
    skipped: int = 0  # steps skipped for a NaN/inf loss
    bad_in_a_row: int = 0
    seconds: float = 0.0  # training time of the run so far, earlier parts of a resumed run included

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """Everything but `total_steps`, which this run's flags decide."""
        for name in self.state_dict():
            if name != "total_steps" and name in saved:
                setattr(self, name, saved[name])


def count_total_steps(stage, run: RunSettings) -> int:
    """Steps of `--epochs` (fractions allowed) over the stage's batches, capped by `--max-steps`."""
    per_epoch = [stage.loader.batches_per_epoch(e) for e in range(math.ceil(run.epochs))]
    total = sum(per_epoch[: int(run.epochs)]) + int(per_epoch[-1] * (run.epochs % 1))
    if run.max_steps > 0:
        total = min(total, run.max_steps) if run.epochs > 0 else run.max_steps
    return total


def build_engine(stage, settings: TrainSettings, total_steps: int) -> tuple:
    """The student in a DeepSpeed engine (data-parallel, ZeRO 0-2) with AdamW; (engine, optimizer, schedule). The
    loop sets the learning rate itself (optim.Schedule), so the engine holds no scheduler. The engine's own bf16
    stays off: a bf16 student trains under autocast (see precision.py)."""
    run = settings.run
    ds_config = load_ds_config(run.ds_config, micro_batch_size=run.batch_size, bf16=False)
    ds_config["gradient_clipping"] = run.grad_clip
    if ds_config.get("zero_optimization", {}).get("stage", 0) > 2:
        raise UserError(f"{run.ds_config}: the student is data-parallel; use ZeRO stage 0, 1 or 2")
    optimizer, schedule = build_optimizer(stage.student, settings.optim, total_steps)
    engine, *_ = distributed.import_deepspeed().initialize(model=stage.student, optimizer=optimizer, config=ds_config)
    return engine, optimizer, schedule


def train(settings: TrainSettings, stage_class) -> Path:
    run = settings.run
    run_dir = Path(run.run_dir)
    check_writable(run_dir)
    env = distributed.init_distributed(run.local_rank)
    watch = PeerWatch(env, lambda: resume_hint(run_dir))
    checkpoint = resolve_resume(run.resume, run_dir)
    precision = run_precision(run.precision, env, run_dir, resuming=checkpoint is not None)
    settings = settings.with_precision(precision.name)  # what the stage's student and teacher compute in
    run = settings.run
    torch.manual_seed(run.seed)
    random.seed(run.seed)
    stage = stage_class(settings, env)  # builds the student first, then any ZeRO-3 teacher
    state = TrainState(total_steps=count_total_steps(stage, run))
    engine, optimizer, schedule = build_engine(stage, settings, state.total_steps)
    stopwatch = Stopwatch()
    if env.world_size > 1 and env.device.type == "cpu":
        # the data-parallel gradient all-reduce: waiting for the slowest rank, then the bytes. Only on the CPU,
        # where the host's clock is the compute's; on a GPU the barrier would stall every step (use profile_step)
        stopwatch.wrap_collective(engine, "allreduce_gradients", "comm")

    if checkpoint is not None:
        saved, extra = load_checkpoint(engine, checkpoint)
        state.load_state_dict(saved)
        stage.load_extra(extra)
        if env.is_main:
            print(
                f"resumed from {checkpoint} at step {state.step} (epoch {state.epoch}, batch {state.batch})", flush=True
            )
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", run_record(settings, stage, env, precision, state))
    online_teacher = getattr(stage, "teacher", None)
    metrics = Metrics(
        run_dir / "tensorboard" if env.is_main else None,
        progress_total=state.total_steps,
        progress_start=state.step,
        show_progress=_show_progress(run.progress, env),
        peak_flops_per_s=online_teacher.matmul_rate() if online_teacher is not None else None,
    )
    sample_log = (
        SampleLog(run_dir / "samples" / f"rank-{env.rank}.tsv", state.epoch, state.batch) if run.sample_log else None
    )
    faults = InjectedFaults()
    profiler = WindowProfiler(run.profile, run_dir / "profile", env.rank, env.device)
    preemption = PreemptionSignal()
    seconds_before = state.seconds

    def run_seconds() -> float:
        return round(seconds_before + metrics.elapsed(), 1)

    def checkpoint_now() -> Path:
        state.seconds = run_seconds()
        return save_checkpoint(engine, run_dir, state.step, state.state_dict(), stage.extra(), run.keep_checkpoints)

    engine.train()  # from_pretrained hands models over in eval mode: dropout on for training
    launched = None  # the last step queued on the device whose verdict the host has not read (see `settle`)

    def settle() -> bool:
        """Read the launched step's verdict (one step later, or at once at a boundary) and count it: a taken
        step advances the step count and its losses are logged; a skipped one (its loss was NaN or inf on some
        rank, so every rank's optimizer left the weights as they were, on the device) does not. The batch is
        spent either way. True if taken."""
        nonlocal launched
        step, launched = launched, None
        taken = not step["verdict"].read()
        stage.settle(taken)
        if taken:
            state.step += 1
            state.bad_in_a_row = 0
            metrics.record(step["terms"], step["sentences"], step["tokens"], stopwatch, step["teacher_flops"])
        else:
            state.skipped += 1
            state.bad_in_a_row += 1
            metrics.scalar("train/skipped_nonfinite_steps", state.skipped, state.step)
        if sample_log:
            sample_log.write(step["epoch"], step["batch"], state.step, "trained" if taken else "skipped", step["keys"])
        if state.bad_in_a_row >= run.max_bad_steps:
            saved = checkpoint_now()  # the last good state: nothing was applied since
            raise UserError(
                f"the loss was NaN or inf {state.bad_in_a_row} times in a row at step "
                f"{state.step}; stopped, the last good state is checkpoint {saved} (lower --lr or check the data)"
            )
        return taken

    def at_boundary(step: int) -> bool:
        """A step after which the loop logs, evaluates, checkpoints or ends: the host must know the step count."""
        every = (run.log_every, run.eval_every, run.checkpoint_every)
        return step == state.total_steps or any(n and step % n == 0 for n in every)

    # Between boundaries nothing here waits for the device: the loss, the skip decision and the update are queued
    # on it, and the previous step's verdict is read after this step's backward is queued.
    while state.step < state.total_steps:
        if state.batch >= stage.loader.batches_per_epoch(state.epoch):
            state.epoch, state.batch = state.epoch + 1, 0
        for number, batch in enumerate(stage.batches(state.epoch, state.batch), start=state.batch):
            launching = state.step + 1 + (launched is not None)  # this step's number once it is taken
            profiler.begin(launching)
            loss, terms = stage.loss(engine, batch, stopwatch)
            faults.mid_step(env.rank, launching, run_dir)
            if faults.nan_at(number):
                loss = loss * float("nan")
            skipped = nonfinite_anywhere(loss)
            engine.backward(loss)
            if launched is not None:
                settle()
            schedule.set(state.step)
            skip_update_if(optimizer, skipped)
            engine.step()
            stage.after_step(batch, skipped)
            launched = {
                "verdict": Verdict(skipped),
                "terms": {"total": loss.detach(), **{k: v.detach() for k, v in terms.items()}},
                **{k: batch[k] for k in ("sentences", "tokens")},
                "teacher_flops": batch.get("teacher_flops", 0.0),
                "epoch": state.epoch,
                "batch": number,
                "keys": batch.get("keys"),
            }
            state.batch = number + 1
            profiler.end(launching)

            stop = preemption.agreed()
            if not (stop or at_boundary(state.step + 1)):
                continue
            if not settle():
                continue
            last = state.step == state.total_steps
            if state.step % run.log_every == 0 or last:
                metrics.flush(state.step, log_gauges(stage, engine, schedule))
            with metrics.paused_clock():
                if run.eval_every and (state.step % run.eval_every == 0 or last):
                    evaluate_and_select(stage, run, env, state, metrics)
                if run.checkpoint_every and state.step % run.checkpoint_every == 0 and not last:
                    checkpoint_now()
            if last:
                break
            if stop:
                saved = checkpoint_now()
                metrics.close()
                preemption.close()
                watch.stop()
                raise Preempted(state.step, saved, preemption.previous_handler)
        if launched is not None:  # the epoch's last step, not at a boundary
            settle()

    checkpoint_now()
    final = run_dir / "final"
    if env.is_main and (run.select == "last" or not final.exists()):
        stage.save_student(final)
    if env.is_main:
        summary = {
            "steps": state.step,
            "epochs_started": state.epoch + 1,
            "best_dev": state.best_dev,
            "final_model": str(final),
            "world_size": env.world_size,
            "skipped_nonfinite_steps": state.skipped,
            "skipped_bad_shards": list(stage.skipped_shards),
            **stage.gauges(),
            "seconds": run_seconds(),
            **_peak_gpu_memory(env.device),
        }
        write_json_atomic(run_dir / "train_summary.json", summary)
        write_model_card(final, stage.name, run_record(settings, stage, env, precision, state), summary, stage.used())
        print(f"finished: {state.step} steps; final model {final}", flush=True)
    metrics.close()
    if sample_log:
        sample_log.close()
    preemption.close()
    distributed.shutdown(watch.close)  # watched until every rank is through the last barrier (rank 0 saves first)
    return final


def run_precision(requested: str, env, run_dir: Path, resuming: bool) -> Precision:
    """--precision for this run: a resumed `auto` run keeps the decision its config.json recorded (a new probe
    could land on the other side of the threshold mid-run); else decided now."""
    config = run_dir / "config.json"
    if resuming and requested == "auto" and config.is_file():
        saved = json.loads(config.read_text()).get("precision_decision")
        if saved and saved.get("requested") == "auto":
            return Precision(**saved)
    return resolve_precision(requested, env.device)


def evaluate_and_select(stage, run: RunSettings, env, state: TrainState, metrics) -> None:
    """STS-B dev Spearman on rank 0 (the others wait at the barrier); keep the best model if selecting."""
    if env.is_main:
        score = stsb_dev_spearman(stage.student.encoder, run.data_root)
        metrics.scalar("eval/stsb_dev_spearman", score, state.step)
        if run.select == "best" and (state.best_dev is None or score > state.best_dev):
            state.best_dev = score
            stage.save_student(Path(run.run_dir) / "final")
            metrics.scalar("eval/best_stsb_dev_spearman", score, state.step)
    state.best_dev = distributed.broadcast_object(state.best_dev)
    distributed.barrier()


def log_gauges(stage, engine, schedule) -> dict:
    """What a log step records beside the losses (host values: read only at a boundary). `lr` is the rate the
    logged step's update used (the schedule is set before each update)."""
    return {"lr": schedule.lr(), "grad_norm": _grad_norm(engine), **stage.gauges()}


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _peak_gpu_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}


def _show_progress(progress: str, env) -> bool:
    return env.is_main and (progress == "on" or (progress == "auto" and sys.stderr.isatty()))


def run_record(settings: TrainSettings, stage, env, precision: Precision, state: TrainState) -> dict:
    """The run's config.json (and what its model card is written from): the flags as given, the precision decided,
    the world size, the steps and the stage."""
    return {
        **settings.flags,
        "world_size": env.world_size,
        "precision_decision": precision.record(),
        "total_steps": state.total_steps,
        "stage": stage.name,
    }
