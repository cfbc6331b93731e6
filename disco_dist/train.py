"""The training loop both stages share, and the two stages.

Read `train` top to bottom: set up ranks, build the stage (student, data, teacher, loss), wrap the
student in a DeepSpeed engine, resume if asked, then step: loss -> backward -> step -> log ->
evaluate -> checkpoint, and finally save the student. A stage supplies the parts that differ:
`Distill` (stage 1: KD/CKD against a frozen ZeRO-3 teacher) and `Finetune` (stage 2: supervised
contrastive on NLI triplets).
"""
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed
from .checkpoint import latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from .config import distill_parser, finetune_parser, parse, to_json
from .encoder import Encoder
from .errors import RankError, UserError, exit_now, exit_on_user_error
from .evaluate import stsb_dev_spearman, write_json_atomic
from .loader import ShardBatches, TripletBatches
from .losses import LogitScale, TeacherQueue, ckd_loss, mse_loss, sup_contrastive_loss
from .metrics import Metrics, SampleLog, Stopwatch
from .shards import iter_shard_samples, read_index, verified_index
from .teacher import ZeroTeacher, load_ds_config, use_bf16


class Preempted(Exception):
    """Training stopped at a step boundary on a pre-emption/time-out signal, after a complete checkpoint."""

    def __init__(self, step: int, checkpoint: Path, previous_handler):
        super().__init__(f"stopped at step {step} on a pre-emption signal; checkpoint {checkpoint} is complete")
        self.step, self.checkpoint, self.previous_handler = step, checkpoint, previous_handler


class PreemptionSignal:
    """SIGUSR2 (SLURM's `--signal=USR2@T`, Submitit's time-out signal) sets a flag; at each step boundary the
    ranks agree (any rank signalled -> all stop), so every rank checkpoints the same step."""

    def __init__(self, signum=signal.SIGUSR2):
        self.flag = False
        self.previous_handler = signal.signal(signum, self._handle)  # Submitit's requeue handler, if any

    def _handle(self, signum, frame):
        self.flag = True

    def agreed(self) -> bool:
        if distributed.world_size() == 1:
            return self.flag
        flag = torch.tensor([1.0 if self.flag else 0.0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


class Student(nn.Module):
    """What the engine trains: the encoder, a projection head (stage 1) and the loss's learnable scale."""

    def __init__(self, encoder: Encoder, head: nn.Module | None = None, scale: LogitScale | None = None):
        super().__init__()
        self.encoder, self.head, self.scale = encoder, head, scale

    def forward(self, input_ids, attention_mask):
        pooled = self.encoder(input_ids, attention_mask, normalize=False)  # the losses normalise themselves
        return self.head(pooled) if self.head is not None else pooled


def train(args, stage_class) -> Path:
    check_writable(Path(args.run_dir))
    env = distributed.init_distributed(args.local_rank)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    run_dir = Path(args.run_dir)
    stage = stage_class(args, env)  # builds the student first, then any ZeRO-3 teacher
    steps_per_epoch = [stage.loader.batches_per_epoch(e) for e in range(math.ceil(args.epochs))]
    total_steps = sum(steps_per_epoch[:int(args.epochs)]) + int(steps_per_epoch[-1] * (args.epochs % 1))
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps) if args.epochs > 0 else args.max_steps

    bf16 = use_bf16(args.precision, env.device)
    ds_config = load_ds_config(args.ds_config, micro_batch_size=args.batch_size, bf16=bf16)
    ds_config["gradient_clipping"] = args.grad_clip
    if ds_config.get("zero_optimization", {}).get("stage", 0) > 2:
        raise UserError(f"{args.ds_config}: the student is data-parallel; use ZeRO stage 0, 1 or 2")
    optimizer = torch.optim.AdamW(param_groups(stage.student, args.weight_decay, args.logit_scale_lr), lr=args.lr,
                                  betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, args.warmup_ratio))
    engine, *_ = distributed.import_deepspeed().initialize(model=stage.student, optimizer=optimizer,
                                                           lr_scheduler=schedule, config=ds_config)
    stopwatch = Stopwatch()
    stopwatch.wrap(engine, "allreduce_gradients", "comm")  # the data-parallel gradient all-reduce

    # seconds: training time of the earlier parts of a resumed run, so its summary reports the whole run's time
    state = {"step": 0, "epoch": 0, "batch": 0, "best_dev": None, "total_steps": total_steps, "skipped": 0,
             "bad_in_a_row": 0, "seconds": 0.0}
    checkpoint = resolve_resume(args.resume, run_dir)
    if checkpoint is not None:
        saved, extra = load_checkpoint(engine, checkpoint)
        state.update({k: saved.get(k, state[k]) for k in ("step", "epoch", "batch", "best_dev", "skipped", "bad_in_a_row",
                                                          "seconds")})
        stage.load_extra(extra)
        if env.is_main:
            print(f"resumed from {checkpoint} at step {state['step']} (epoch {state['epoch']}, batch {state['batch']})",
                  flush=True)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", {**to_json(args), "world_size": env.world_size, "bf16": bf16,
                                                    "total_steps": total_steps, "stage": stage.name})
    metrics = Metrics(run_dir / "tensorboard" if env.is_main else None, progress_total=total_steps,
                      progress_start=state["step"], show_progress=_show_progress(args, env))

    engine.train()  # from_pretrained hands models over in eval mode: dropout on for training
    sample_log = (SampleLog(run_dir / "samples" / f"rank-{env.rank}.tsv", state["epoch"], state["batch"])
                  if args.sample_log else None)
    faults = InjectedFaults()

    seconds_before = state["seconds"]

    def run_seconds() -> float:
        return round(seconds_before + metrics.elapsed(), 1)

    def checkpoint_now():
        state["seconds"] = run_seconds()
        return save_checkpoint(engine, run_dir, state["step"], state, stage.extra(), args.keep_checkpoints)

    preemption = PreemptionSignal()

    while state["step"] < total_steps:
        if state["batch"] >= stage.loader.batches_per_epoch(state["epoch"]):
            state["epoch"], state["batch"] = state["epoch"] + 1, 0
        for batch in stage.batches(state["epoch"], state["batch"]):
            loss, terms = stage.loss(engine, batch, stopwatch)
            faults.mid_step(env.rank, state["step"] + 1, run_dir)
            if faults.nan_at(state["batch"]):
                loss = loss * float("nan")
            if not finite_on_every_rank(loss):
                # skip the update on every rank (no backward, no step); the batch is spent, the step is not
                if sample_log:
                    sample_log.write(state["epoch"], state["batch"], state["step"], "skipped", batch["keys"])
                state["batch"] += 1
                state["skipped"] += 1
                state["bad_in_a_row"] += 1
                metrics.scalar("train/skipped_nonfinite_steps", state["skipped"], state["step"])
                if state["bad_in_a_row"] >= args.max_bad_steps:
                    saved = checkpoint_now()  # the last good state: nothing was applied since
                    raise UserError(f"the loss was NaN or inf {state['bad_in_a_row']} times in a row at step "
                                    f"{state['step']}; stopped, the last good state is checkpoint {saved} "
                                    "(lower --lr or check the data)")
                continue
            state["bad_in_a_row"] = 0
            engine.backward(loss)
            engine.step()
            stage.after_step(batch)
            state["step"] += 1
            if sample_log:
                sample_log.write(state["epoch"], state["batch"], state["step"], "trained", batch["keys"])
            state["batch"] += 1
            metrics.record({"total": loss, **terms}, sentences=batch["sentences"], tokens=batch["tokens"], stopwatch=stopwatch)
            if state["step"] % args.log_every == 0 or state["step"] == total_steps:
                metrics.flush(state["step"], {"lr": schedule.get_last_lr()[0], "grad_norm": _grad_norm(engine),
                                              **stage.gauges()})
            with metrics.paused_clock():
                if args.eval_every and (state["step"] % args.eval_every == 0 or state["step"] == total_steps):
                    evaluate_and_select(stage, args, env, state, metrics, run_dir)
                if args.checkpoint_every and state["step"] % args.checkpoint_every == 0 and state["step"] < total_steps:
                    checkpoint_now()
            if state["step"] >= total_steps:
                break
            if preemption.agreed():
                saved = checkpoint_now()
                metrics.close()
                raise Preempted(state["step"], saved, preemption.previous_handler)
    checkpoint_now()
    final = run_dir / "final"
    if env.is_main and (args.select == "last" or not final.exists()):
        stage.student.encoder.save(final)
    if env.is_main:
        write_json_atomic(run_dir / "train_summary.json", {
            "steps": state["step"], "epochs_started": state["epoch"] + 1, "best_dev": state["best_dev"],
            "final_model": str(final), "world_size": env.world_size, "skipped_nonfinite_steps": state["skipped"],
            "skipped_bad_shards": getattr(stage, "skipped_shards", []),
            **stage.gauges(),
            "seconds": run_seconds()})
        print(f"finished: {state['step']} steps; final model {final}", flush=True)
    metrics.close()
    if sample_log:
        sample_log.close()
    distributed.shutdown()
    return final


def run_stage(args, stage_class) -> Path | None:
    """What a launcher runs: `train`, and on pre-emption a SLURM requeue (outside Submitit, which has its own)."""
    try:
        return train(args, stage_class)
    except RuntimeError as err:
        if not lost_a_peer(err):
            raise
        latest = latest_checkpoint(args.run_dir)
        reason = re.sub(r"^\[[^\]]*\] ", "", str(err).splitlines()[0])[:120]  # without gloo's source location
        raise RankError(f"lost contact with another rank ({reason}): it died or was killed, "
                        f"see its log; the last complete checkpoint is {latest or 'none yet'}; "
                        "rerun with --resume auto") from None
    except Preempted as stop:
        job = os.environ.get("SLURM_JOB_ID")
        if distributed.rank() == 0:
            print(f"{stop}", flush=True)
            if job and "SUBMITIT_FOLDER" not in os.environ:
                subprocess.run(["scontrol", "requeue", job], check=False)  # argv list: no shell
                print(f"requeued SLURM job {job}; it resumes from the checkpoint (--resume auto)", flush=True)
            else:
                print("rerun with --resume auto to continue", flush=True)
        exit_now(EXIT_PREEMPTED)


EXIT_PREEMPTED = 3


def lost_a_peer(err: RuntimeError) -> bool:
    """A collective failed because another rank is gone (gloo: connection closed; any backend: time-out)."""
    if isinstance(err, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(err)
    return any(sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "timed out",
                                         "Timed out", "NCCL communicator was aborted"))


def evaluate_and_select(stage, args, env, state, metrics, run_dir):
    """STS-B dev Spearman on rank 0 (the others wait at the barrier); keep the best model if selecting."""
    if env.is_main:
        score = stsb_dev_spearman(stage.student.encoder, args.data_root)
        metrics.scalar("eval/stsb_dev_spearman", score, state["step"])
        if args.select == "best" and (state["best_dev"] is None or score > state["best_dev"]):
            state["best_dev"] = score
            stage.student.encoder.save(run_dir / "final")
            metrics.scalar("eval/best_stsb_dev_spearman", score, state["step"])
    state["best_dev"] = distributed.broadcast_object(state["best_dev"])
    distributed.barrier()


def check_writable(run_dir: Path) -> None:
    """Fail at the start, in one line, if the run folder cannot take files (not a folder, read-only, full)."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as err:
        raise UserError(f"run folder {run_dir} is not writable ({err.strerror}); choose another --run-dir "
                        "or free space there") from None


def head_init_ridge(head: nn.Linear, features: torch.Tensor, targets: torch.Tensor, strength: float = 1e-3) -> None:
    """Set the projection head to the ridge-regularised least-squares map from student to teacher embeddings,
    so the head starts where it does not disturb the pretrained student. Pooled features are close to rank
    deficient (a plain lstsq there returns huge, unstable weights that blow training up), hence the ridge:
    `strength` times the mean feature variance on the diagonal."""
    x, y = features.double(), targets.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    ridge = strength * gram.diagonal().mean()
    weight = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), xc.T @ yc)  # (in, out)
    with torch.no_grad():
        head.weight.copy_(weight.T.float())
        head.bias.copy_((y_mean - x_mean @ weight).float())


def finite_on_every_rank(loss: torch.Tensor) -> bool:
    """One small all-reduce: every rank skips (or takes) the same step."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if distributed.world_size() > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad.item() == 0.0


class InjectedFaults:
    """Faults the reliability tests inject, read from the environment once:
    DISCO_INJECT_NAN_AT_BATCHES=3,4 makes the loss of those batches (numbered within the epoch) NaN;
    DISCO_KILL_RANK_AT_STEP=1:7 makes rank 1 SIGKILL itself in the middle of step 7 (after the forward,
    before the backward), first writing the time to <run-dir>/killed-at."""

    def __init__(self):
        self.nan_batches = set(filter(None, os.environ.get("DISCO_INJECT_NAN_AT_BATCHES", "").split(",")))
        rank_step = os.environ.get("DISCO_KILL_RANK_AT_STEP")
        self.kill = tuple(int(x) for x in rank_step.split(":")) if rank_step else None

    def nan_at(self, batch: int) -> bool:
        return str(batch) in self.nan_batches

    def mid_step(self, rank: int, step: int, run_dir: Path) -> None:
        if self.kill == (rank, step):
            (run_dir / "killed-at").write_text(f"{time.time()}\n")
            os.kill(os.getpid(), signal.SIGKILL)


def param_groups(model: Student, weight_decay: float, scale_lr: float | None = None) -> list:
    """Weight decay on matrices only (not on biases, LayerNorm weights or the logit scale); the learnable
    logit scale in a group of its own when it has its own learning rate (scale_lr; None: the optimizer's)."""
    scale = list(model.scale.parameters()) if scale_lr is not None and model.scale is not None else []
    own = {id(p) for p in scale}
    trained = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    groups = [{"params": [p for p in trained if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0}]
    return groups + ([{"params": scale, "weight_decay": 0.0, "lr": scale_lr}] if scale else [])


def warmup_cosine(total_steps: int, warmup_ratio: float):
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _show_progress(args, env) -> bool:
    return env.is_main and (args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty()))


class Distill:
    """Stage 1: the student (plus a projection head) learns to reproduce the frozen teacher's embeddings."""

    name = "distill"

    def __init__(self, args, env):
        self.args, self.env = args, env
        index = verified_index(read_index(args.shards), env.rank, env.world_size, args.bad_shards)
        self.skipped_shards = index.skipped
        mode = args.teacher_mode if args.teacher_mode != "auto" else ("cached" if index.teacher else "online")
        if mode == "cached" and not index.teacher:
            raise UserError(f"--teacher-mode cached: {args.shards} holds no teacher embeddings; make them with "
                            "`deepspeed launchers/cache_teacher.py` or use --teacher-mode online")
        self.mode = mode
        encoder = Encoder.from_pretrained(args.student, max_length=args.max_length, keep=args.keep_layers)
        # the student exists before the teacher's ZeRO-3 loading context opens (it is process-global)
        self.teacher = None
        if mode == "online":
            self.teacher = ZeroTeacher(args.teacher, args.teacher_ds_config, env.device,
                                       batch_size=args.teacher_batch_size, max_length=args.max_length,
                                       precision=args.precision)
            teacher_dim = self.teacher.dim
        else:
            teacher_dim = index.teacher["dim"]
        head = self._head(encoder, teacher_dim, index)
        scale = LogitScale(args.logit_scale, learnable=not args.fixed_logit_scale) if args.loss == "ckd" else None
        self.student = Student(encoder, head, scale).to(env.device)
        self.queue = TeacherQueue(args.queue_size if args.loss == "ckd" else 0, teacher_dim, device=env.device)
        if os.environ.get("DISCO_BENCH_FILL_QUEUE") == "1":  # benchmarks: time a long run's full-queue steps at once
            self.queue.push(torch.nn.functional.normalize(torch.randn(self.queue.size, teacher_dim), dim=-1).to(env.device))
        self.loader = ShardBatches(index, args.batch_size, env.rank, env.world_size, self.collate, seed=args.seed,
                                   shuffle_buffer=args.shuffle_buffer, length_bucket=args.length_bucket,
                                   num_workers=args.num_workers)
        self._last_keys = None
        self._teacher_seconds_counted = self.teacher.seconds if self.teacher else 0.0

    def _head(self, encoder: Encoder, teacher_dim: int, index) -> nn.Module | None:
        args = self.args
        if args.head == "none":
            if encoder.dim != teacher_dim:
                raise UserError(f"--head none: the student is {encoder.dim} wide, the teacher {teacher_dim}; "
                                "use --head linear to project")
            return None
        head = nn.Linear(encoder.dim, teacher_dim)
        if args.head_init == "lstsq":
            texts, targets = self._head_samples(index)
            head_init_ridge(head, encoder.encode(texts, batch_size=128, normalize=False), targets)
        return head

    def _head_samples(self, index):
        """The first N sentences of the shards (the same on every rank) and their teacher embeddings."""
        samples = []
        for text, teacher in iter_shard_samples(index.paths()):
            samples.append((text, teacher))
            if len(samples) == self.args.head_init_samples:
                break
        texts = [t for t, _ in samples]
        if self.teacher is not None:
            return texts, self.teacher.embed(texts)  # every rank embeds the same sentences: equal forwards
        return texts, torch.from_numpy(np.stack([e for _, e in samples]).astype(np.float32))

    def collate(self, texts, teacher):
        batch = self.student.encoder.tokenize(texts)
        return {"texts": texts, "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "teacher": teacher, "sentences": len(texts), "tokens": int(batch["attention_mask"].sum())}

    def batches(self, epoch, start):
        batches = self.loader.batches(epoch, start)
        if self.teacher is None:
            return batches
        return self._with_online_teacher(batches)

    def _with_online_teacher(self, batches):
        """Embed several student batches per teacher forward (`--teacher-batch-size` sentences), so the
        ZeRO-3 parameter gathering is paid once for all of them. Every rank has the same batch count, so
        every rank runs the same number of teacher forwards."""
        per_forward = max(1, self.teacher.batch_size // self.args.batch_size)
        group = []
        for batch in batches:
            group.append(batch)
            if len(group) == per_forward:
                yield from self._embed_group(group)
                group = []
        if group:
            yield from self._embed_group(group)

    def _embed_group(self, group):
        embeddings = self.teacher.embed([text for batch in group for text in batch["texts"]])
        start = 0
        for batch in group:
            batch["teacher"] = embeddings[start:start + batch["sentences"]]
            start += batch["sentences"]
            yield batch

    def loss(self, engine, batch, stopwatch):
        device = self.env.device
        teacher = batch["teacher"].to(device)
        student = engine(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        terms = {}
        if self.args.loss == "ckd":
            with stopwatch.timing("comm"):
                self._last_keys = distributed.all_gather_no_grad(teacher)
            terms["ckd"] = ckd_loss(student, self._last_keys, engine.module.scale(), self.queue.negatives())
            if self.args.mse_weight:
                terms["mse"] = mse_loss(student, teacher)
            total = terms["ckd"] + self.args.mse_weight * terms.get("mse", 0.0)
        else:
            terms["mse"] = total = mse_loss(student, teacher)
        if self.teacher is not None:  # the teacher ran ahead, in `batches`; count its time where it is used
            stopwatch.add("teacher", self.teacher.seconds - self._teacher_seconds_counted)
            self._teacher_seconds_counted = self.teacher.seconds
        return total, terms

    def after_step(self, batch):
        if self._last_keys is not None:
            self.queue.push(self._last_keys)  # after the loss: a batch is never its own negative
            self._last_keys = None

    def gauges(self) -> dict:
        out = {"queue_fill": self.queue.filled / self.queue.size if self.queue.size else 0.0}
        if self.student.scale is not None:
            out["logit_scale"] = float(self.student.scale().detach())
        return out

    def extra(self) -> dict:
        return {"queue": self.queue.state_dict(), "skipped_shards": self.skipped_shards}

    def load_extra(self, extra: dict) -> None:
        self.queue.load_state_dict(extra["queue"])
        before = extra.get("skipped_shards", [])
        if before != self.skipped_shards:  # the data order depends on the shard list
            raise UserError(f"the checkpoint was trained without shards {before or 'none'}, this run would skip "
                            f"{self.skipped_shards or 'none'}; restore the same shards to resume, or start a new run")


class Finetune:
    """Stage 2: supervised SimCSE on (anchor, entailment, contradiction) triplets."""

    name = "finetune"

    def __init__(self, args, env):
        from .data import read_nli_triplets

        self.args, self.env = args, env
        triplets = read_nli_triplets(args.nli, args.data_root)
        if args.max_triplets:
            triplets = tuple(column[:args.max_triplets] for column in triplets)
        encoder = Encoder.from_pretrained(args.student, max_length=args.max_length, keep=args.keep_layers)
        scale = LogitScale(1.0 / args.temperature, learnable=args.learnable_temperature)
        self.student = Student(encoder, None, scale).to(env.device)
        self.loader = TripletBatches(triplets, args.batch_size, env.rank, env.world_size, self.collate, seed=args.seed)

    def collate(self, anchors, positives, negatives):
        texts = anchors + positives + ([] if self.args.no_hard_negatives else negatives)
        batch = self.student.encoder.tokenize(texts)  # one forward for all three columns
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "size": len(anchors),
                "sentences": len(texts), "tokens": int(batch["attention_mask"].sum())}

    def batches(self, epoch, start):
        return self.loader.batches(epoch, start)

    def loss(self, engine, batch, stopwatch):
        device = self.env.device
        embeddings = engine(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        size = batch["size"]
        anchor, positive = embeddings[:size], embeddings[size:2 * size]
        negative = None if self.args.no_hard_negatives else embeddings[2 * size:]
        loss = sup_contrastive_loss(anchor, positive, negative, 1.0 / engine.module.scale(),
                                    gather=stopwatch.timed("comm", distributed.all_gather_with_grad))
        return loss, {"sup_contrastive": loss}

    def after_step(self, batch):
        pass

    def gauges(self) -> dict:
        return {"temperature": float(1.0 / self.student.scale().detach())}

    def extra(self) -> dict:
        return {}

    def load_extra(self, extra: dict) -> None:
        pass


STAGES = {"distill": (distill_parser, Distill), "finetune": (finetune_parser, Finetune)}


@exit_on_user_error
def launch(stage: str, argv=None) -> None:
    """The whole body of a training launcher: flags -> train (requeued on pre-emption) -> exit once on disk."""
    make_parser, stage_class = STAGES[stage]
    run_stage(parse(make_parser(), argv), stage_class)
    distributed.exit_process(0)  # skip the interpreter teardown (see distributed.exit_process)
