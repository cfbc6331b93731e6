"""The two training stages the loop runs: what each trains, on which batches, with which loss.

`Distill` (stage 1): the student (plus a projection head) learns the frozen teacher's embeddings, by MSE-KD
or CKD with negatives gathered from every rank and a queue; the teacher is cached in the shards or runs
online under ZeRO-3. `Finetune` (stage 2): supervised SimCSE on NLI triplets.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..cluster import distributed
from ..cluster.distributed import to_device
from ..core.errors import UserError
from ..data import token_ids
from ..data.loader import ShardBatches, TripletBatches
from ..data.shards import iter_shard_samples, read_index, verified_index
from ..models.encoder import Encoder
from ..models.teacher import ZeroTeacher
from .losses import LogitScale, TeacherQueue, ckd_loss, matryoshka_loss, mse_loss, sup_contrastive_loss
from .settings import TrainSettings
from .student import STUDENT_INPUTS, Student, head_init_ridge, student_inputs


class Stage:
    """What a training stage gives the loop (`train.train`). A subclass sets `name`, `student` (a `Student`) and
    `loader` (its batches per epoch), and defines `loss`; the rest has defaults:
        batches(epoch, start)     the batches of `epoch` from number `start` on (resume mid-epoch)
        loss(engine, batch, sw)   (total loss, {term: value}) for one batch; `sw` times communication
        after_step(batch, skipped)  after the optimizer step (e.g. push keys into a queue); `skipped`: the step's
                                  verdict on the device (set when its update was skipped), not yet read
        settle(taken)             the host has read that verdict (a step later, or at a boundary)
        gauges()                  scalars logged with the losses and written to the run summary
        extra() / load_extra(d)   state a checkpoint keeps beside the engine's (e.g. the queue)
        save_student(folder)      write the model a user gets (the encoder, with `saved_head` if one is kept)
        skipped_shards            shard names left out of the data (reported in the run summary)
    """

    name: str
    skipped_shards: tuple = ()
    saved_head = None  # a head saved with the encoder in place of its own (see Encoder.save)

    def batches(self, epoch: int, start: int):
        return self.loader.batches(epoch, start)

    def loss(self, engine, batch: dict, stopwatch) -> tuple:
        raise NotImplementedError

    def after_step(self, batch: dict, skipped: torch.Tensor) -> None:
        pass

    def settle(self, taken: bool) -> None:
        pass

    def gauges(self) -> dict:
        return {}

    def extra(self) -> dict:
        return {}

    def load_extra(self, extra: dict) -> None:
        pass

    def save_student(self, folder) -> None:
        self.student.encoder.save(folder, head=self.saved_head)

    def used(self) -> dict:
        """What the saved model's card should say this stage learned from (see model_card.stage_record)."""
        return {}


class Distill(Stage):
    """Stage 1: the student (plus a projection head) learns to reproduce the frozen teacher's embeddings."""

    name = "distill"

    def __init__(self, settings: TrainSettings, env):
        self.settings, self.env = settings, env
        index = verified_index(read_index(settings.data.shards), env.rank, env.world_size, settings.data.bad_shards)
        self.skipped_shards, self.index = index.skipped, index
        mode = (
            settings.data.teacher_mode
            if settings.data.teacher_mode != "auto"
            else ("cached" if index.teacher else "online")
        )
        if mode == "cached" and not index.teacher:
            raise UserError(
                f"--teacher-mode cached: {settings.data.shards} holds no teacher embeddings; make them with "
                "`deepspeed launchers/cache_teacher.py` or use --teacher-mode online"
            )
        self.mode = mode
        encoder = Encoder.from_pretrained(
            settings.student.model, max_length=settings.student.max_length, keep=settings.student.keep_layers
        )
        # the student exists before the teacher's ZeRO-3 loading context opens (it is process-global)
        self.teacher = None
        if mode == "online":
            self.teacher = ZeroTeacher(settings.teacher, env.device)
            teacher_dim = self.teacher.dim
        else:
            teacher_dim = index.teacher["dim"]
        self.widths = settings.student.widths or [(encoder.dim, 1.0)]
        head, prefix_heads = self._heads(encoder, teacher_dim, index)
        if settings.student.keep_head and (head is None or encoder.dense is not None):
            raise UserError(
                "--keep-head: this run has no head of its own to keep (--head none)"
                if head is None
                else f"--keep-head: the student {settings.student.model} already has a Dense head; start from its "
                "encoder alone"
            )
        self.saved_head = head if settings.student.keep_head else None
        scale = (
            LogitScale(settings.loss.logit_scale, learnable=not settings.loss.fixed_logit_scale)
            if settings.loss.loss == "ckd"
            else None
        )
        self.student = Student.for_run(settings, encoder, head, scale, prefix_heads).to(env.device)
        self.queue = TeacherQueue(
            settings.loss.queue_size if settings.loss.loss == "ckd" else 0, teacher_dim, device=env.device
        )
        if settings.loss.prefill_queue:  # benchmarks: time a long run's full-queue steps from step 1
            self.queue.push(
                torch.nn.functional.normalize(torch.randn(self.queue.size, teacher_dim), dim=-1).to(env.device)
            )
        self.loader = ShardBatches(
            index,
            settings.run.batch_size,
            env.rank,
            env.world_size,
            self.collate,
            seed=settings.run.seed,
            shuffle_buffer=settings.data.shuffle_buffer,
            length_bucket=settings.data.length_bucket,
            num_workers=settings.data.num_workers,
            with_ids=token_ids.usable(index, encoder),
        )
        note = token_ids.mismatch_note(index, encoder)
        if note and env.is_main:
            print(note, flush=True)
        self._last_keys = None
        self._teacher_seconds_counted = self.teacher.seconds if self.teacher else 0.0

    def _heads(self, encoder: Encoder, teacher_dim: int, index) -> tuple:
        """The projection head of the full width (None with --head none) and one per narrower Matryoshka
        width ({width: head}), each initialised by the ridge fit on its prefix of the student's embeddings."""
        if self.settings.student.head == "none" and encoder.dim != teacher_dim:
            raise UserError(
                f"--head none: the student is {encoder.dim} wide, the teacher {teacher_dim}; "
                "use --head linear to project"
            )
        widths = [d for d, _ in self.widths[1:]] + ([] if self.settings.student.head == "none" else [encoder.dim])
        heads = {d: nn.Linear(d, teacher_dim) for d in widths}
        if self.settings.student.head_init == "lstsq" and heads:
            texts, targets = self._head_samples(index)
            features = encoder.encode(texts, batch_size=128, normalize=False)
            for d, head in heads.items():
                head_init_ridge(head, features[:, :d], targets)
        return heads.pop(encoder.dim, None), heads

    def _head_samples(self, index):
        """N sentences of the shards (the same on every rank) and their teacher embeddings: the first N with
        seed 0, the N after the first seed x N with another seed (the first N if the shards hold too few)."""
        wanted, skip = (
            self.settings.student.head_init_samples,
            self.settings.student.head_init_samples * self.settings.run.seed,
        )
        samples, first = [], []
        for position, (text, teacher) in enumerate(iter_shard_samples(index)):
            if position < wanted:
                first.append((text, teacher))
            if position >= skip:
                samples.append((text, teacher))
            if len(samples) == wanted:
                break
        samples = samples if len(samples) == wanted else first
        texts = [t for t, _ in samples]
        if self.teacher is not None:
            return texts, self.teacher.embed(texts)  # every rank embeds the same sentences: equal forwards
        return texts, torch.from_numpy(np.stack([e for _, e in samples]).astype(np.float32))

    def collate(self, texts, teacher, ids=None):
        """A batch of `texts`: tokenised here, or padded from the shards' stored `ids` (the same tensors)."""
        encoder = self.student.encoder
        batch = encoder.tokenize(texts) if ids is None else token_ids.pad(encoder, ids)
        return {
            "texts": texts,
            **student_inputs(batch),
            "teacher": teacher,
            "sentences": len(texts),
            "tokens": int(batch["attention_mask"].sum()),
        }

    def batches(self, epoch, start):
        if self.teacher is None:
            return self.loader.batches(epoch, start)
        return self._with_online_teacher(epoch, start)

    def _with_online_teacher(self, epoch, start):
        """Embed several student batches per teacher forward (`--teacher-batch-size` sentences), so the
        ZeRO-3 parameter gathering is paid once for all of them. Every rank has the same batch count, so
        every rank runs the same number of teacher forwards.

        The groups are fixed by the batch's place in the epoch (batches 0..G-1, G..2G-1, ...), not by where
        this run started: a run resumed at batch 10 with groups of 4 embeds batches 8-11 together, as the
        uninterrupted run did, and drops 8 and 9 (trained before the checkpoint). A teacher's output for a
        sentence depends at the last bit on the other sentences of its forward (padding length, matrix
        shapes), so a resume that regrouped them trained on slightly different targets."""
        per_forward = max(1, self.teacher.batch_size // self.settings.run.batch_size)
        group_start = start - start % per_forward
        group = []
        for batch in self.loader.batches(epoch, group_start):
            group.append(batch)
            if len(group) == per_forward:
                yield from self._embed_group(group, skip=max(0, start - group_start))
                group, group_start = [], group_start + per_forward
        if group:
            yield from self._embed_group(group, skip=max(0, start - group_start))

    def _embed_group(self, group, skip: int = 0):
        """Embed the group's sentences in one call; yield its batches from the `skip`-th on."""
        flops = self.teacher.flops
        embeddings = self.teacher.embed([text for batch in group for text in batch["texts"]], on_device=True)
        flops, offset = self.teacher.flops - flops, 0
        for batch in group:
            batch["teacher"] = embeddings[offset : offset + batch["sentences"]]
            batch["teacher_flops"] = flops * batch["sentences"] / len(embeddings)  # its share, for the teacher's MFU
            offset += batch["sentences"]
        yield from group[skip:]

    def loss(self, engine, batch, stopwatch):
        device = self.env.device
        teacher = to_device(batch["teacher"], device)
        outputs = engine(*(to_device(batch[k], device) for k in STUDENT_INPUTS))
        if self.settings.loss.loss == "ckd":
            with stopwatch.timing("comm"):
                self._last_keys = distributed.all_gather_no_grad(teacher)
        terms = {}

        def plain_loss(student, width):  # the loss of one width's output; its terms logged by name (and width)
            if self.settings.loss.loss == "mse":
                found = {"mse": mse_loss(student, teacher)}
                loss = found["mse"]
            else:
                queue, valid = self.queue.negatives()
                found = {"ckd": ckd_loss(student, self._last_keys, engine.module.scale(), queue, queue_valid=valid)}
                loss = found["ckd"]
                if self.settings.loss.mse_weight:
                    found["mse"] = mse_loss(student, teacher)
                    loss = loss + self.settings.loss.mse_weight * found["mse"]
            suffix = f"@{width}" if len(self.widths) > 1 else ""
            terms.update({f"{name}{suffix}": value for name, value in found.items()})
            return loss

        total = matryoshka_loss(plain_loss, outputs, self.widths)
        if self.teacher is not None:  # the teacher ran ahead, in `batches`; count its time where it is used
            stopwatch.add("teacher", self.teacher.seconds - self._teacher_seconds_counted)
            self._teacher_seconds_counted = self.teacher.seconds
        return total, terms

    def after_step(self, batch, skipped):
        if self._last_keys is not None:
            self.queue.push(self._last_keys, skipped)  # after the loss: a batch is never its own negative
            self._last_keys = None

    def settle(self, taken):
        self.queue.settle(taken)

    def used(self) -> dict:
        teacher = self.teacher.describe()["model"] if self.teacher is not None else self.index.teacher["model"]
        source = Path(str(self.index.meta.get("source", self.settings.data.shards))).name
        return {"teacher": teacher, "data": f"{self.index.total:,} sentences of {source}"}

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

    def __init__(self, settings: TrainSettings, env):
        from ..data.nli import read_nli_triplets

        self.settings, self.env = settings, env
        triplets = read_nli_triplets(settings.data.nli, settings.run.data_root)
        if settings.data.max_triplets:
            triplets = tuple(column[: settings.data.max_triplets] for column in triplets)
        encoder = Encoder.from_pretrained(
            settings.student.model, max_length=settings.student.max_length, keep=settings.student.keep_layers
        )
        if encoder.dense is not None and settings.student.student_head != "through":  # see config_output.STUDENT_HEAD
            self.saved_head = encoder.dense.requires_grad_(False) if settings.student.student_head == "frozen" else None
            encoder.dense = None
        self.widths = settings.student.widths or [(encoder.dim, 1.0)]
        scale = LogitScale(1.0 / settings.loss.temperature, learnable=settings.loss.learnable_temperature)
        self.student = Student.for_run(settings, encoder, None, scale).to(env.device)
        self.loader = TripletBatches(
            triplets, settings.run.batch_size, env.rank, env.world_size, self.collate, seed=settings.run.seed
        )

    def collate(self, anchors, positives, negatives):
        texts = anchors + positives + ([] if self.settings.data.no_hard_negatives else negatives)
        batch = self.student.encoder.tokenize(texts)  # one forward for all three columns
        return {
            **student_inputs(batch),
            "size": len(anchors),
            "sentences": len(texts),
            "tokens": int(batch["attention_mask"].sum()),
        }

    def loss(self, engine, batch, stopwatch):
        device = self.env.device
        outputs = engine(*(to_device(batch[k], device) for k in STUDENT_INPUTS))
        size, terms = batch["size"], {}

        def plain_loss(embeddings, width):
            negative = None if self.settings.data.no_hard_negatives else embeddings[2 * size :]
            terms[f"sup_contrastive@{width}" if len(self.widths) > 1 else "sup_contrastive"] = loss = (
                sup_contrastive_loss(
                    embeddings[:size],
                    embeddings[size : 2 * size],
                    negative,
                    1.0 / engine.module.scale(),
                    gather=stopwatch.timed("comm", distributed.all_gather_with_grad),
                )
            )
            return loss

        return matryoshka_loss(plain_loss, outputs, self.widths), terms

    def gauges(self) -> dict:
        return {"temperature": float(1.0 / self.student.scale().detach())}


STAGES = {"distill": Distill, "finetune": Finetune}
