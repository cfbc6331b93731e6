"""A training run's settings in typed sections, read by name: built once from the parsed flags at the command's door
(`cli/settings.py`), never from the flags themselves below it."""

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..models.teacher import TeacherSettings
from .optim import OptimSettings


@dataclass(frozen=True)
class RunSettings:
    """Where the run lives, how long it runs, how often it logs, scores and checkpoints, and what it keeps."""

    run_dir: Path
    seed: int = 0
    epochs: float = 1.0
    max_steps: int = 0  # > 0: stop there (alone when epochs is 0)
    batch_size: int = 64  # per rank
    precision: str = "auto"  # fp32, bf16 or auto (resolved once at start-up, kept by a resumed run)
    ds_config: str = ""  # the student's DeepSpeed config (ZeRO 0, 1 or 2)
    grad_clip: float = 1.0
    resume: str | None = None  # a checkpoint folder, "auto" or None
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0  # 0: score STS-B dev only at the end
    select: str = "last"  # "best": keep the best STS-B dev step as final/
    max_bad_steps: int = 10
    progress: str = "auto"
    sample_log: bool = False
    profile: tuple | None = None  # (FIRST, LAST): torch.profiler over steps FIRST+1 .. LAST
    data_root: str | None = None  # where STS-B dev (and NLI) are read from
    local_rank: int = -1


@dataclass(frozen=True)
class StudentSettings:
    """The student: where it starts, which layers and head it keeps, the widths it learns, how it computes."""

    model: str
    max_length: int = 128
    keep_layers: list | None = None  # None: all of them
    widths: tuple | None = None  # checked Matryoshka (width, weight) pairs, widest first; None: the full width only
    freeze_word_embeddings: bool = False
    unpadded: str = "auto"
    head: str = "linear"  # distillation: a projection to the teacher's width ("none": none)
    head_init: str = "lstsq"
    head_init_samples: int = 2000
    keep_head: bool = False
    student_head: str = "through"  # fine-tuning: what happens to a Dense head the student already has


@dataclass(frozen=True)
class LossSettings:
    """The loss: CKD or MSE-KD for distillation, the contrastive loss of fine-tuning."""

    loss: str = "ckd"
    queue_size: int = 65_536
    prefill_queue: bool = False
    logit_scale: float = 2.718281828
    fixed_logit_scale: bool = False
    mse_weight: float = 0.0
    temperature: float = 0.05
    learnable_temperature: bool = False


@dataclass(frozen=True)
class DataSettings:
    """What a rank reads: the shards and how they stream (distillation), or the NLI triplets (fine-tuning)."""

    shards: Path | str | None = None  # a folder, or a URL or pipe: command (stream.location)
    bad_shards: int = 0
    teacher_mode: str = "auto"  # cached, online, or auto (cached when the shards hold teacher embeddings)
    shuffle_buffer: int = 10_000
    length_bucket: int = 16
    num_workers: int = 0
    nli: list | None = None  # NLI files; None: the shared SNLI triplets
    max_triplets: int = 0
    no_hard_negatives: bool = False  # fine-tuning: anchors and positives only


@dataclass(frozen=True)
class TrainSettings:
    """Every section of a run, and the flags as given (what the run's config.json records)."""

    run: RunSettings
    student: StudentSettings
    optim: OptimSettings
    loss: LossSettings = field(default_factory=LossSettings)
    data: DataSettings = field(default_factory=DataSettings)
    teacher: TeacherSettings | None = None  # distillation's teacher (used online, or named by the cache)
    flags: dict = field(default_factory=dict)

    def with_precision(self, name: str) -> "TrainSettings":
        """The run's settings once `--precision` is decided: what the student and any teacher compute in."""
        teacher = None if self.teacher is None else replace(self.teacher, precision=name)
        return replace(
            self, run=replace(self.run, precision=name), teacher=teacher, flags={**self.flags, "precision": name}
        )
