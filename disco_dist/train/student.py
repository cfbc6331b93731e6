"""What the engine trains: the student encoder, its projection head and the loss's scale, at one or more
Matryoshka widths; the inputs its forward takes; and the ridge fit that starts a projection head."""

import torch
from torch import nn

from ..core.errors import UserError
from ..models.encoder import Encoder
from ..models.masks import token_index
from ..models.unpadded import supports as supports_unpadded
from .settings import TrainSettings

STUDENT_INPUTS = ("input_ids", "attention_mask", "token_index")


def student_inputs(tokenized) -> dict:
    """What the student's forward takes, made on the host with the batch: the token ids, the mask and the flat
    positions of the real tokens (so the padding-free forward never asks the device for them)."""
    mask = tokenized["attention_mask"]
    return {"input_ids": tokenized["input_ids"], "attention_mask": mask, "token_index": token_index(mask)}


class Student(nn.Module):
    """What the engine trains: the encoder, a projection head (stage 1) and the loss's learnable scale; with
    Matryoshka widths `dims` (widest first, the encoder's full width), the prefix of each narrower width
    through its own head in `prefix_heads` ({width: head}; a width without one is used as is)."""

    def __init__(self, encoder: Encoder, head=None, scale=None, bf16=False, unpadded="off", dims=(), prefix_heads=()):
        super().__init__()
        self.encoder, self.head, self.scale, self.bf16 = encoder, head, scale, bf16
        self.dims = tuple(dims) or (encoder.dim,)
        if self.dims[0] != encoder.dim or any(not 0 < d < encoder.dim for d in self.dims[1:]):
            raise UserError(
                f"--matryoshka-dims {' '.join(map(str, self.dims))}: the widest must be the student's width, "
                f"{encoder.dim}, the others narrower"
            )
        self.prefix_heads = nn.ModuleDict({str(d): h for d, h in dict(prefix_heads).items()})
        # --unpadded auto: the padding-free forward where the architecture has one (BERT family; see unpadded.py)
        encoder.unpadded = unpadded == "auto" and encoder.pooling != "pooler" and supports_unpadded(encoder.model)

    @classmethod
    def for_run(cls, settings: TrainSettings, encoder: Encoder, head=None, scale=None, prefix_heads=()) -> "Student":
        widths = settings.student.widths or ()
        if settings.student.freeze_word_embeddings:
            encoder.model.get_input_embeddings().requires_grad_(False)
        return cls(
            encoder,
            head,
            scale,
            settings.run.precision == "bf16",
            settings.student.unpadded,
            [d for d, _ in widths],
            prefix_heads,
        )

    def forward(self, input_ids, attention_mask, token_index=None) -> tuple:
        """fp32 embeddings, unnormalised (the losses normalise themselves), one per width of `dims` (one without
        Matryoshka); with bf16, computed under autocast on the fp32 weights (mixed precision: the weights,
        gradients and losses stay fp32). `token_index`: see Encoder.forward."""
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            pooled = self.encoder(input_ids, attention_mask, normalize=False, token_index=token_index)
            outs = [self.head(pooled) if self.head is not None else pooled]
            for d in self.dims[1:]:
                head = self.prefix_heads[str(d)] if str(d) in self.prefix_heads else None
                outs.append(head(pooled[:, :d]) if head is not None else pooled[:, :d])
        return tuple(out.float() for out in outs)


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
