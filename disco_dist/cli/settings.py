"""The parsed flags, turned once into each wing's typed settings: what the library below the command's door reads.

Flags and settings share their names, so a section takes the flags of its fields; the few that differ (the
student's `model` is `--student`, the teacher's fields are `--teacher-*`, the checked Matryoshka `widths`) are
named here.
"""

from dataclasses import fields
from pathlib import Path

from ..models.teacher import TeacherSettings
from ..train.optim import OptimSettings
from ..train.settings import DataSettings, LossSettings, RunSettings, StudentSettings, TrainSettings
from ..train.widths import matryoshka_weights


def teacher_settings(args) -> TeacherSettings:
    """The teacher `--teacher`, `--teacher-ds-config` and the other teacher flags describe."""
    return TeacherSettings(
        model=args.teacher,
        ds_config=args.teacher_ds_config,
        batch_size=args.teacher_batch_size,
        max_length=args.max_length,
        precision=args.precision,
        prompt=args.teacher_prompt,
        dim=args.teacher_dim,
        replicated=args.teacher_replicated,
    )


def flags_record(args) -> dict:
    """The flags as given, as JSON values (a run's config.json)."""

    def plain(v):
        return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, list) else v

    return {k: plain(v) for k, v in sorted(vars(args).items()) if k not in ("local_rank", "config")}


def _section(cls, flags: dict, **named):
    return cls(**{f.name: flags[f.name] for f in fields(cls) if f.name in flags and f.name not in named}, **named)


def train_settings(args) -> TrainSettings:
    """A training stage's settings from its parsed flags (distillation and fine-tuning take different flags)."""
    flags = vars(args)
    return TrainSettings(
        run=_section(RunSettings, flags),
        student=_section(
            StudentSettings,
            flags,
            model=args.student,
            widths=matryoshka_weights(args.matryoshka_dims, args.matryoshka_weights),
        ),
        optim=_section(OptimSettings, flags),
        loss=_section(LossSettings, flags),
        data=_section(DataSettings, flags),
        teacher=teacher_settings(args) if "teacher" in flags else None,
        flags=flags_record(args),
    )
