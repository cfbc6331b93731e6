"""The pipeline's commands, one function each: what `launchers/<name>.py`, a SLURM batch script and a Submitit
job run. A launcher is `main(name)`; the pipeline calls `run_command(name, argv)`, which lets a `UserError`
travel whole to the caller (Submitit hands it to submit.py).

    python -m disco_dist.cli.commands NAME [FLAGS...]      # the same as python launchers/NAME.py [FLAGS...]
"""

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..cluster import distributed
from ..core.errors import exit_on_user_error
from . import config


def make_shards(args) -> Path:
    from ..data.make_shards import make_shards as write_shards
    from ..data.paths import resolve_data_root

    corpus = Path(args.corpus) if args.corpus else resolve_data_root(args.data_root) / config.DEFAULT_CORPUS
    write_shards(
        corpus,
        args.out,
        args.shard_size,
        args.seed,
        args.limit,
        args.overwrite,
        text_field=args.text_field,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        bad_rows=args.bad_rows,
        shuffle_rows=args.shuffle_rows,
    )
    return args.out


def tokenize_shards(args) -> Path:
    from ..data.token_ids import tokenize_shards as write_ids

    write_ids(args.shards, args.out, args.student, args.max_length, args.workers, args.overwrite)
    return args.out


def cache_teacher(args) -> Path:
    from ..cluster.ds_config import load_ds_config
    from ..cluster.peer_watch import PeerWatch
    from ..cluster.resilience import lost_peer_as_one_line
    from ..core.errors import UserError
    from ..data.cache import cache_teacher_embeddings, resolve_token_budget
    from ..data.shards import read_index
    from ..models.teacher import ZeroTeacher
    from .settings import teacher_settings

    if args.sort_group is not None and args.sort_group < 1:
        raise UserError(f"--sort-group must be at least 1, got {args.sort_group}")
    if args.teacher_token_budget is not None and args.teacher_token_budget < 0:
        raise UserError(f"--teacher-token-budget must be 0 (off) or more, got {args.teacher_token_budget}")
    read_index(args.shards)  # a bad folder or config fails here, before any rank loads the teacher
    load_ds_config(args.teacher_ds_config)
    env = distributed.init_distributed(args.local_rank)

    def hint() -> str:
        again = "the same command" + (" without --overwrite" if args.overwrite else "")
        return f"the shards finished so far in {args.out} are kept; rerun {again} to continue"

    with lost_peer_as_one_line(hint):
        watch = PeerWatch(env, hint)  # a silent peer ends the pass within DISCO_PEER_TIMEOUT, not the 600 s time-out
        teacher = ZeroTeacher(teacher_settings(args), env.device)
        budget = resolve_token_budget(
            args.teacher_token_budget, args.teacher_batch_size is not None, teacher, args.out, args.overwrite
        )
        cache_teacher_embeddings(
            teacher,
            args.shards,
            args.out,
            env,
            overwrite=args.overwrite,
            group_sentences=args.sort_group,
            token_budget=budget,
            profile=args.profile,
        )
        distributed.shutdown(watch.close)  # watched through the last barrier (rank 0 writes the index first)
    return args.out


def train_stage(args, stage: str) -> str:
    """`train` for one stage; a lost peer becomes one line, a pre-emption a requeue (and an exit)."""
    from ..cluster.resilience import Preempted, lost_peer_as_one_line, requeue_after
    from ..train.checkpoint import resume_hint
    from ..train.loop import train
    from ..train.stages import STAGES
    from .settings import train_settings

    try:
        with lost_peer_as_one_line(lambda: resume_hint(args.run_dir)):
            return str(train(train_settings(args), STAGES[stage]))
    except Preempted as stop:
        requeue_after(stop)


def evaluate(args) -> Path:
    import torch

    from ..core.files import write_json_atomic
    from ..core.hardware import hardware
    from ..evaluation.evaluate import TeacherSide, evaluation_record, format_table, score_sts
    from ..models.encoder import Encoder
    from ..report.model_card import update_model_card

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = Encoder.from_pretrained(
        args.model,
        pooling=args.pooling,
        max_length=args.max_length,
        keep=args.keep_layers,
        prompt=args.prompt,
        truncate_dim=args.dim,
        head=not args.no_head,
    )
    encoder.to(device)
    teacher = None
    if args.against_teacher:
        teacher = TeacherSide(args.against_teacher, args.teacher_cache, args.batch_size, sys.stderr.isatty(), device)
    start = time.time()
    found = score_sts(
        encoder, args.data_root, args.tasks, args.batch_size, sys.stderr.isatty(), args.dims or (), teacher
    )
    label = args.label or args.model
    rows = {label: found["scores"]}
    rows.update({f"{label} @{d}": scores for d, scores in found["scores_by_dim"].items()})
    if teacher is not None:
        rows[f"{label} vs teacher"] = found["asymmetric"]
        rows[f"teacher {args.against_teacher}"] = found["teacher_scores"]
    print(format_table(rows))
    record = {
        **evaluation_record(args.model, encoder, found["scores"], time.time() - start),
        "keep_layers": args.keep_layers,
        "head": encoder.dense is not None,
        "dims": encoder.dim,
        **{key: found[key] for key in ("scores_by_dim", "asymmetric", "teacher_scores") if found.get(key)},
        "speed": found["speed"],
        "hardware": hardware(),
    }
    write_json_atomic(args.out, record)
    print(f"wrote {args.out}")
    # the card describes the model as saved: scores of a reshaped or prompted model are not its scores
    reshaped = args.no_head or args.dim or args.pooling or args.max_length or args.keep_layers
    as_saved = not reshaped and args.prompt is None
    if as_saved and update_model_card(args.model, record):
        print(f"model card {args.model}/README.md updated with these scores")
    return args.out


@dataclass(frozen=True)
class Command:
    parser: Callable  # () -> config.Parser
    run: Callable  # (args) -> result
    training: bool = False  # flags through config.parse (config file, checks)
    ranks: bool = False  # may run as several ranks: end the process without the interpreter's teardown


COMMANDS = {
    "make_shards": Command(config.make_shards_parser, make_shards),
    "cache_teacher": Command(config.cache_teacher_parser, cache_teacher, ranks=True),
    "tokenize_shards": Command(config.tokenize_shards_parser, tokenize_shards),
    "distill": Command(config.distill_parser, lambda args: train_stage(args, "distill"), training=True, ranks=True),
    "finetune": Command(config.finetune_parser, lambda args: train_stage(args, "finetune"), training=True, ranks=True),
    "evaluate": Command(config.evaluate_parser, evaluate),
}


def run_command(name: str, argv=None, description: str | None = None):
    """Parse `argv` with the command's flags and run it; a UserError reaches the caller. `description`: the
    --help text to show instead of the parser's own (a launcher's docstring, with its examples)."""
    command = COMMANDS[name]
    parser = command.parser()
    if description:
        parser.description, parser.formatter_class = description, argparse.RawDescriptionHelpFormatter
    args = config.parse(parser, argv) if command.training else parser.parse_args(argv)
    return command.run(args)


def main(name: str, argv=None, description: str | None = None) -> None:
    """The whole body of a launcher: one line for a user's error, and a clean exit once results are on disk."""
    exit_on_user_error(run_command)(name, argv, description)
    if COMMANDS[name].ranks:
        distributed.exit_process(0)  # skip the interpreter teardown (see distributed.exit_process)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m disco_dist.cli.commands {{{','.join(COMMANDS)}}} [FLAGS...]")
    main(sys.argv[1], sys.argv[2:])
