"""The two training stages the loop runs: what each trains, on which batches, with which loss.

`Distill` (stage 1): the student (plus a projection head) learns the frozen teacher's embeddings, by MSE-KD
or CKD with negatives gathered from every rank and a queue; the teacher is cached in the shards or runs
online under ZeRO-3. `Finetune` (stage 2): supervised SimCSE on NLI triplets.
"""

import numpy as np
import torch
from torch import nn

from . import distributed
from .encoder import Encoder
from .errors import UserError
from .loader import ShardBatches, TripletBatches
from .losses import LogitScale, TeacherQueue, ckd_loss, mse_loss, sup_contrastive_loss
from .shards import iter_shard_samples, read_index, verified_index
from .teacher import ZeroTeacher
from .unpadded import supports as supports_unpadded


class Stage:
    """What a training stage gives the loop (`train.train`). A subclass sets `name`, `student` (a `Student`) and
    `loader` (its batches per epoch), and defines `loss`; the rest has defaults:
        batches(epoch, start)     the batches of `epoch` from number `start` on (resume mid-epoch)
        loss(engine, batch, sw)   (total loss, {term: value}) for one batch; `sw` times communication
        after_step(batch)         after the optimizer step (e.g. push keys into a queue)
        gauges()                  scalars logged with the losses and written to the run summary
        extra() / load_extra(d)   state a checkpoint keeps beside the engine's (e.g. the queue)
        skipped_shards            shard names left out of the data (reported in the run summary)
    """

    name: str
    skipped_shards: tuple = ()

    def batches(self, epoch: int, start: int):
        return self.loader.batches(epoch, start)

    def loss(self, engine, batch: dict, stopwatch) -> tuple:
        raise NotImplementedError

    def after_step(self, batch: dict) -> None:
        pass

    def gauges(self) -> dict:
        return {}

    def extra(self) -> dict:
        return {}

    def load_extra(self, extra: dict) -> None:
        pass


class Student(nn.Module):
    """What the engine trains: the encoder, a projection head (stage 1) and the loss's learnable scale."""

    def __init__(self, encoder: Encoder, head=None, scale: LogitScale | None = None, bf16=False, unpadded="off"):
        super().__init__()
        self.encoder, self.head, self.scale, self.bf16 = encoder, head, scale, bf16
        # --unpadded auto: the padding-free forward where the architecture has one (BERT family; see unpadded.py)
        encoder.unpadded = unpadded == "auto" and encoder.pooling != "pooler" and supports_unpadded(encoder.model)

    def forward(self, input_ids, attention_mask):
        """fp32 embeddings, unnormalised (the losses normalise themselves); with bf16, computed under autocast
        on the fp32 weights (mixed precision: the weights, gradients and losses stay fp32)."""
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            pooled = self.encoder(input_ids, attention_mask, normalize=False)
            out = self.head(pooled) if self.head is not None else pooled
        return out.float()


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


class Distill(Stage):
    """Stage 1: the student (plus a projection head) learns to reproduce the frozen teacher's embeddings."""

    name = "distill"

    def __init__(self, args, env):
        self.args, self.env = args, env
        index = verified_index(read_index(args.shards), env.rank, env.world_size, args.bad_shards)
        self.skipped_shards = index.skipped
        mode = args.teacher_mode if args.teacher_mode != "auto" else ("cached" if index.teacher else "online")
        if mode == "cached" and not index.teacher:
            raise UserError(
                f"--teacher-mode cached: {args.shards} holds no teacher embeddings; make them with "
                "`deepspeed launchers/cache_teacher.py` or use --teacher-mode online"
            )
        self.mode = mode
        encoder = Encoder.from_pretrained(args.student, max_length=args.max_length, keep=args.keep_layers)
        # the student exists before the teacher's ZeRO-3 loading context opens (it is process-global)
        self.teacher = None
        if mode == "online":
            self.teacher = ZeroTeacher.from_args(args, env.device)
            teacher_dim = self.teacher.dim
        else:
            teacher_dim = index.teacher["dim"]
        head = self._head(encoder, teacher_dim, index)
        scale = LogitScale(args.logit_scale, learnable=not args.fixed_logit_scale) if args.loss == "ckd" else None
        self.student = Student(encoder, head, scale, bf16=args.precision == "bf16", unpadded=args.unpadded).to(
            env.device
        )
        self.queue = TeacherQueue(args.queue_size if args.loss == "ckd" else 0, teacher_dim, device=env.device)
        if args.prefill_queue:  # benchmarks: time a long run's full-queue steps from step 1
            self.queue.push(
                torch.nn.functional.normalize(torch.randn(self.queue.size, teacher_dim), dim=-1).to(env.device)
            )
        self.loader = ShardBatches(
            index,
            args.batch_size,
            env.rank,
            env.world_size,
            self.collate,
            seed=args.seed,
            shuffle_buffer=args.shuffle_buffer,
            length_bucket=args.length_bucket,
            num_workers=args.num_workers,
        )
        self._last_keys = None
        self._teacher_seconds_counted = self.teacher.seconds if self.teacher else 0.0

    def _head(self, encoder: Encoder, teacher_dim: int, index) -> nn.Module | None:
        args = self.args
        if args.head == "none":
            if encoder.dim != teacher_dim:
                raise UserError(
                    f"--head none: the student is {encoder.dim} wide, the teacher {teacher_dim}; "
                    "use --head linear to project"
                )
            return None
        head = nn.Linear(encoder.dim, teacher_dim)
        if args.head_init == "lstsq":
            texts, targets = self._head_samples(index)
            head_init_ridge(head, encoder.encode(texts, batch_size=128, normalize=False), targets)
        return head

    def _head_samples(self, index):
        """The first N sentences of the shards (the same on every rank) and their teacher embeddings."""
        samples = []
        for text, teacher in iter_shard_samples(index):
            samples.append((text, teacher))
            if len(samples) == self.args.head_init_samples:
                break
        texts = [t for t, _ in samples]
        if self.teacher is not None:
            return texts, self.teacher.embed(texts)  # every rank embeds the same sentences: equal forwards
        return texts, torch.from_numpy(np.stack([e for _, e in samples]).astype(np.float32))

    def collate(self, texts, teacher):
        batch = self.student.encoder.tokenize(texts)
        return {
            "texts": texts,
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "teacher": teacher,
            "sentences": len(texts),
            "tokens": int(batch["attention_mask"].sum()),
        }

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
            batch["teacher"] = embeddings[start : start + batch["sentences"]]
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
            raise UserError(
                f"the checkpoint was trained without shards {before or 'none'}, this run would skip "
                f"{self.skipped_shards or 'none'}; restore the same shards to resume, or start a new run"
            )


class Finetune(Stage):
    """Stage 2: supervised SimCSE on (anchor, entailment, contradiction) triplets."""

    name = "finetune"

    def __init__(self, args, env):
        from .data import read_nli_triplets

        self.args, self.env = args, env
        triplets = read_nli_triplets(args.nli, args.data_root)
        if args.max_triplets:
            triplets = tuple(column[: args.max_triplets] for column in triplets)
        encoder = Encoder.from_pretrained(args.student, max_length=args.max_length, keep=args.keep_layers)
        scale = LogitScale(1.0 / args.temperature, learnable=args.learnable_temperature)
        self.student = Student(encoder, None, scale, bf16=args.precision == "bf16", unpadded=args.unpadded).to(
            env.device
        )
        self.loader = TripletBatches(triplets, args.batch_size, env.rank, env.world_size, self.collate, seed=args.seed)

    def collate(self, anchors, positives, negatives):
        texts = anchors + positives + ([] if self.args.no_hard_negatives else negatives)
        batch = self.student.encoder.tokenize(texts)  # one forward for all three columns
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "size": len(anchors),
            "sentences": len(texts),
            "tokens": int(batch["attention_mask"].sum()),
        }

    def loss(self, engine, batch, stopwatch):
        device = self.env.device
        embeddings = engine(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        size = batch["size"]
        anchor, positive = embeddings[:size], embeddings[size : 2 * size]
        negative = None if self.args.no_hard_negatives else embeddings[2 * size :]
        loss = sup_contrastive_loss(
            anchor,
            positive,
            negative,
            1.0 / engine.module.scale(),
            gather=stopwatch.timed("comm", distributed.all_gather_with_grad),
        )
        return loss, {"sup_contrastive": loss}

    def gauges(self) -> dict:
        return {"temperature": float(1.0 / self.student.scale().detach())}


STAGES = {"distill": Distill, "finetune": Finetune}
