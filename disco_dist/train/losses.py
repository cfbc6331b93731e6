"""Losses as pure functions of embeddings (plus the small state they need: a logit scale, a queue).

Each returns the loss of this rank's samples, averaged over them. Under the engine's gradient averaging
over W ranks with equal batches, W ranks x B give the same loss and gradients as 1 rank x W*B. Other
ranks' embeddings come in gathered: the student's own with gradient (`gather` in sup_contrastive_loss),
the frozen teacher's without (gathered by the caller for ckd_loss); `this_rank` says where this rank's
rows sit in a gathered batch.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..cluster.distributed import all_gather_with_grad, rank


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Plain KD: mean squared error between the projected student embedding and the teacher's."""
    return F.mse_loss(student, teacher.to(student.dtype))


def ckd_loss(
    student: torch.Tensor,
    teacher_keys: torch.Tensor,
    logit_scale: torch.Tensor,
    queue: torch.Tensor | None = None,
    this_rank: int | None = None,
    queue_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Contrastive KD: q_i must pick out k_i, the teacher embedding of the same sentence, among the teacher
    embeddings of the global batch and of the queue.

    student: (B, D) this rank's projected student embeddings; teacher_keys: (W*B, D) the teacher embeddings
    of the global batch (every rank's, gathered; this rank's rows at this_rank*B); logit_scale: the scalar s
    (not its log); queue: (M, D) earlier teacher embeddings, already L2-normalised (TeacherQueue stores them
    so), or None; queue_valid: (M,) bool, the rows that count (None: all; see TeacherQueue.negatives). The
    student and batch keys are L2-normalised here. The teacher is frozen, so its gathered
    embeddings need no gradient: each rank's loss depends on its own q's alone, and the engine's gradient
    average over ranks is the gradient of the global mean.

    The queue block's logits are never concatenated with the batch block's: the cross-entropy's
    log-sum-exp is combined from the two blocks (a copy of a 65,536-row queue per step costs more than the
    matmul's share of the step)."""
    q = F.normalize(student, dim=-1)
    keys = F.normalize(teacher_keys.to(q.dtype), dim=-1)
    logits = logit_scale * q @ keys.T
    offset = (rank() if this_rank is None else this_rank) * len(q)
    positive = logits[torch.arange(len(q), device=q.device), torch.arange(offset, offset + len(q), device=q.device)]
    log_normaliser = torch.logsumexp(logits, dim=1)
    if queue is not None and len(queue):
        queue_logits = logit_scale * q @ queue.to(q.dtype).T
        if queue_valid is not None:  # a finite floor, not -inf: a row of all-masked logits keeps finite gradients
            queue_logits = queue_logits.masked_fill(~queue_valid, torch.finfo(queue_logits.dtype).min)
        log_normaliser = torch.logaddexp(log_normaliser, torch.logsumexp(queue_logits, dim=1))
    return (log_normaliser - positive).mean()


def sup_contrastive_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    hard_negative: torch.Tensor | None,
    temperature: torch.Tensor | float,
    gather=all_gather_with_grad,
    this_rank: int | None = None,
) -> torch.Tensor:
    """Supervised SimCSE: each anchor against every rank's positives and hard negatives (cosine / temperature).

    The candidates are the student's own embeddings, so the gather must carry gradient back to the rank
    that produced them; a gather without gradient silently trains a different loss."""
    a = F.normalize(anchor, dim=-1)
    candidates = [gather(F.normalize(positive, dim=-1))]
    if hard_negative is not None:
        candidates.append(gather(F.normalize(hard_negative, dim=-1)))
    logits = a @ torch.cat(candidates, dim=0).T / temperature
    offset = (rank() if this_rank is None else this_rank) * len(a)
    labels = torch.arange(offset, offset + len(a), device=a.device)
    return F.cross_entropy(logits, labels)


def matryoshka_loss(loss, outputs, widths) -> torch.Tensor:
    """Matryoshka representation learning (Kusupati et al., 2022), as sentence-transformers' MatryoshkaLoss
    applies it: the same loss on the embedding at each width, weighted and summed, so that every prefix of the
    embedding is usable on its own.

    loss: (embedding, width) -> scalar loss; outputs: one (B, d) tensor per width, widest first, as the model
    gives that width (its prefix, or the prefix through a head of its own); widths: (width, weight) pairs in the
    same order. With one width of weight 1 it is the plain loss."""
    if len(outputs) != len(widths):
        raise ValueError(f"{len(outputs)} outputs for {len(widths)} widths")
    return sum(weight * loss(out, width) for out, (width, weight) in zip(outputs, widths))


class LogitScale(nn.Module):
    """A learnable positive scalar kept as its log (CLIP-style), clamped when read; or a fixed value."""

    def __init__(self, initial: float, learnable: bool = True, max_value: float = 100.0):
        super().__init__()
        log_value = torch.tensor([math.log(initial)])  # 1-d: DeepSpeed cannot broadcast 0-d parameters
        if learnable:
            self.log_value = nn.Parameter(log_value)
        else:
            self.register_buffer("log_value", log_value)
        self.max_value = max_value

    def forward(self) -> torch.Tensor:
        return self.log_value.exp().clamp(max=self.max_value)


class TeacherQueue:
    """FIFO of earlier teacher embeddings (the same on every rank, since it holds gathered batches).

    A push may wait for its step's verdict: `push(keys, skipped)` writes on the device, keeping the old rows where
    `skipped` (a 0-dim device tensor, set when the step's update was skipped for a non-finite loss) is set, and
    `settle(taken)` moves the host's pointer once the loop has read the verdict, a step later; the loop never
    waits on the device for it. Until then `negatives` masks the pushed rows by the device verdict (only while
    the queue is not yet full: a full queue's rows are all valid, new or old)."""

    def __init__(self, size: int, dim: int, dtype=torch.float32, device="cpu"):
        self.size = size
        self.buffer = torch.zeros(size, dim, dtype=dtype, device=device)
        self.pointer = 0
        self.filled = 0
        self.pending = 0  # rows written by a push whose step's verdict the host has not read
        self.pending_skipped = None

    def negatives(self) -> tuple:
        """(rows, valid): the queue's rows, and a (rows,) bool mask of those that count, or None when all do."""
        if self.pending == 0 or self.filled == self.size:
            return (self.buffer[: self.filled] if self.filled else None), None
        rows = min(self.size, self.filled + self.pending)
        settled = torch.arange(rows, device=self.buffer.device) < self.filled
        return self.buffer[:rows], settled | ~self.pending_skipped.bool()

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor, skipped: torch.Tensor | None = None) -> None:
        """Store the newest teacher embeddings, L2-normalised (ckd_loss takes the queue as unit vectors); with
        `skipped`, only where it is not set, and counted once `settle(True)` says so."""
        if self.size == 0:
            return
        if self.pending:
            raise RuntimeError("TeacherQueue.push: the previous push is not settled")
        embeddings = F.normalize(embeddings[-self.size :].float(), dim=-1).to(self.buffer.dtype)
        slots = (self.pointer + torch.arange(len(embeddings), device=self.buffer.device)) % self.size
        if skipped is not None:
            embeddings = torch.where(skipped.bool(), self.buffer[slots], embeddings)
        self.buffer[slots] = embeddings
        self.pending, self.pending_skipped = len(embeddings), skipped
        if skipped is None:
            self.settle(True)

    def settle(self, taken: bool) -> None:
        """The verdict of the last push's step: taken (its rows count) or skipped (they were not written)."""
        if taken and self.pending:
            self.pointer = (self.pointer + self.pending) % self.size
            self.filled = min(self.size, self.filled + self.pending)
        self.pending, self.pending_skipped = 0, None

    def state_dict(self) -> dict:
        if self.pending:
            raise RuntimeError("TeacherQueue.state_dict: settle the last push first")
        return {"buffer": self.buffer[: self.filled].cpu(), "pointer": self.pointer, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        if state["filled"] > self.size:
            raise ValueError(
                f"checkpointed queue holds {state['filled']} embeddings, more than --queue-size {self.size}"
            )
        self.buffer[: state["filled"]] = state["buffer"].to(self.buffer)
        self.pointer, self.filled = state["pointer"], state["filled"]
