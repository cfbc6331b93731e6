"""The flags stop at the command's door: each training stage's flags become typed settings once, every flag lands
in a setting (a new flag left unwired fails here), and the values a run reads are the values given."""

from dataclasses import fields
from pathlib import Path

import pytest

from disco_dist.cli import config
from disco_dist.cli.settings import train_settings
from disco_dist.core.errors import UserError

# flags whose setting has another name, or that the door itself consumes (--config: the file read into the flags)
NAMED = {
    "config",
    "student",
    "matryoshka_dims",
    "matryoshka_weights",
    "teacher",
    "teacher_ds_config",
    "teacher_batch_size",
    "teacher_prompt",
    "teacher_dim",
    "teacher_replicated",
}


@pytest.mark.parametrize(
    "parser, argv",
    [(config.distill_parser, ["--shards", "s"]), (config.finetune_parser, [])],
    ids=["distill", "finetune"],
)
def test_every_flag_of_a_training_stage_lands_in_a_setting(parser, argv):
    args = parser().parse_args(argv)
    settings = train_settings(args)
    sections = [settings.run, settings.student, settings.optim, settings.loss, settings.data]
    taken = {f.name for section in sections for f in fields(section)}
    assert set(vars(args)) - taken - NAMED == set()


def test_the_settings_hold_the_values_given():
    args = config.distill_parser().parse_args(
        "--shards s --student st --keep-layers 0 2 --lr 0.123 --batch-size 7 --queue-size 9 --loss mse "
        "--matryoshka-dims 384 128 --matryoshka-weights 1 0.5 --teacher t --teacher-batch-size 11 --max-length 33 "
        "--teacher-replicated --precision fp32 --max-bad-steps 4 --num-workers 2".split()
    )
    s = train_settings(args)
    assert (s.student.model, s.student.keep_layers, s.student.max_length) == ("st", [0, 2], 33)
    assert s.student.widths == [(384, 1.0), (128, 0.5)]
    assert (s.optim.lr, s.run.batch_size, s.run.max_bad_steps, s.run.precision) == (0.123, 7, 4, "fp32")
    assert (s.loss.loss, s.loss.queue_size, s.data.shards, s.data.num_workers) == ("mse", 9, Path("s"), 2)
    assert (s.teacher.model, s.teacher.batch_size, s.teacher.max_length, s.teacher.replicated) == ("t", 11, 33, True)
    assert s.flags["lr"] == 0.123 and "local_rank" not in s.flags and "config" not in s.flags


def test_fine_tuning_has_no_teacher_and_bad_widths_are_one_line_at_the_door():
    assert train_settings(config.finetune_parser().parse_args([])).teacher is None
    with pytest.raises(UserError, match="--matryoshka-weights"):
        train_settings(config.finetune_parser().parse_args("--matryoshka-dims 384 --matryoshka-weights 1 1".split()))


def test_the_decided_precision_reaches_the_student_the_teacher_and_the_record():
    s = train_settings(config.distill_parser().parse_args(["--shards", "s", "--precision", "auto"]))
    decided = s.with_precision("bf16")
    assert (decided.run.precision, decided.teacher.precision, decided.flags["precision"]) == ("bf16",) * 3
    assert s.run.precision == "auto"  # the flags' settings are left as they were
