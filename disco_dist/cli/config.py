"""Command-line flags of every pipeline command, with an optional JSON config file for the training stages.

Precedence: command line > `--config FILE` (JSON, keys are flag names with _ or -) > defaults.
`check_common` turns every bad path and incompatible combination into one line before any work starts.
Flags more than one command takes are defined once, by the `add_*` helpers.
"""

import argparse
import json
from pathlib import Path

from ..core.errors import UserError
from ..core.files import DS_CONFIGS
from ..core.profiling import profile_window
from ..data import stream
from ..models import precision
from ..train.widths import matryoshka_weights
from . import config_output, config_teacher

DATA_ROOT_HELP = "data folder (default: $DISCO_DATA_ROOT or ../shared/data)"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line too, exit 2
        raise UserError(f"{self.prog}: {message} (see --help)")


def add_data_root(group) -> None:
    group.add_argument("--data-root", help=DATA_ROOT_HELP)


def add_local_rank(group) -> None:
    """The flag the `deepspeed` launcher passes to each rank (the environment's LOCAL_RANK serves as well)."""
    group.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)


def add_precision_flag(parser, what_bf16_means: str) -> None:
    parser.add_argument(
        "--precision",
        choices=precision.CHOICES,
        default=precision.default_precision(),
        help=f"bf16: {what_bf16_means}; auto: bf16 on a GPU that has it, and on a CPU whose bf16 matmul runs "
        f">= {precision.BF16_MIN_SPEEDUP}x fp32 (timed at start-up), else fp32 (default: $DISCO_PRECISION, else auto)",
    )


def _common(parser: Parser, stage: str) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--config", type=Path, help="JSON file of flag values (the command line overrides it)")
    g.add_argument("--run-dir", type=Path, default=Path("runs") / stage, help=f"run folder (default runs/{stage})")
    g.add_argument(
        "--resume",
        default=None,
        help="'auto' (newest complete checkpoint in the run folder, if any) or a checkpoint folder",
    )
    g.add_argument("--seed", type=int, default=0)
    add_data_root(g)
    add_local_rank(g)
    g = parser.add_argument_group("student and optimisation")
    g.add_argument("--max-length", type=int, default=128, help="max tokens per sentence, student and teacher")
    g.add_argument("--batch-size", type=int, default=64, help="sentences (stage 2: triplets) per rank per step")
    g.add_argument("--epochs", type=float, default=1, help="passes over the data (fractions allowed)")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no cap)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument(
        "--logit-scale-lr",
        type=float,
        help="learning rate of a learnable logit scale (stage 2: temperature), kept as its log "
        "(default: --lr, at which it barely moves in a run of ~1,000 steps)",
    )
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="share of steps with linear warm-up")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipping (0: off)")
    g.add_argument(
        "--ds-config",
        type=Path,
        default=DS_CONFIGS / "student_zero0.json",
        help="DeepSpeed config of the student engine (ZeRO 0, 1 or 2)",
    )
    add_precision_flag(g, "the student trains under bf16 autocast (fp32 weights), an online teacher holds bf16")
    g.add_argument(
        "--unpadded",
        choices=("auto", "off"),
        default="auto",
        help="auto: the student's dense layers compute real tokens only, not padding, where its architecture "
        "allows (BERT family, e.g. MiniLM); same results to float rounding",
    )
    g.add_argument(
        "--freeze-word-embeddings",
        action="store_true",
        help="keep the student's word embeddings as they are: no gradient, no optimizer state and no all-reduce "
        "of their (vocabulary x width) gradient, most of a small student (S2: 11.7M of 17.4M parameters)",
    )
    g.add_argument("--num-workers", type=int, default=0, help="tokenising worker processes per rank")
    g = parser.add_argument_group("checkpoints, monitoring, selection")
    g.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="keep the newest K complete checkpoints")
    g.add_argument("--log-every", type=int, default=10, help="steps between TensorBoard points")
    g.add_argument(
        "--eval-every",
        type=int,
        default=0 if stage == "distill" else 50,
        help="steps between STS-B dev evaluations on rank 0 (0: none)",
    )
    g.add_argument(
        "--select",
        choices=("last", "best"),
        default="last" if stage == "distill" else "best",
        help="final model: the last step's, or the best by STS-B dev Spearman",
    )
    g.add_argument(
        "--max-bad-steps",
        type=int,
        default=10,
        help="NaN/inf losses are skipped and counted; after this many in a row the run stops",
    )
    g.add_argument("--progress", choices=("auto", "on", "off"), default="auto", help="progress bar on rank 0")
    g.add_argument(
        "--sample-log",
        action="store_true",
        help="log the keys of every consumed batch per rank under <run-dir>/samples/ (an audit of the data order)",
    )
    add_profile_flag(g, "step", "<run-dir>")


def distill_parser() -> Parser:
    parser = Parser(
        prog="distill.py",
        description="Stage 1: KD or CKD from a frozen ZeRO-3 teacher into a student, "
        "on shards made by launchers/make_shards.py.",
    )
    _common(parser, "distill")
    g = parser.add_argument_group("models")
    g.add_argument("--student", default="all-MiniLM-L6-v2", help="student: folder, fetched name or hub id")
    g.add_argument("--keep-layers", type=int, nargs="+", metavar="I", help="keep only these student layers")
    config_teacher.add_teacher_flags(g)
    g = parser.add_argument_group("data and loss")
    g.add_argument(
        "--shards",
        type=stream.location,
        default=Path("runs") / "shards",
        help="shard folder (with teacher embeddings: cached mode), or an http(s):// URL of one, or "
        "'pipe:COMMAND' printing the file {name} (e.g. 'pipe:aws s3 cp s3://bucket/shards/{name} -')",
    )
    g.add_argument(
        "--teacher-mode",
        choices=("auto", "online", "cached"),
        default="auto",
        help="auto: cached when the shards hold teacher embeddings, else online",
    )
    g.add_argument(
        "--bad-shards",
        choices=("stop", "skip"),
        default="stop",
        help="a shard that does not match its index entry (truncated, corrupt, changed): stop the run "
        "before training, or leave it out on every rank with a warning",
    )
    g.add_argument("--shuffle-buffer", type=int, default=10_000)
    g.add_argument("--length-bucket", type=int, default=16, help="batches grouped by length (1: off)")
    g.add_argument("--loss", choices=("ckd", "mse"), default="ckd")
    g.add_argument("--mse-weight", type=float, default=0.0, help="with --loss ckd: add this times the MSE term")
    g.add_argument("--queue-size", type=int, default=65_536, help="CKD queue of earlier teacher embeddings")
    g.add_argument("--logit-scale", type=float, default=2.718281828, help="CKD's initial logit scale")
    g.add_argument("--fixed-logit-scale", action="store_true", help="do not learn the logit scale")
    g.add_argument(
        "--head",
        choices=("linear", "none"),
        default="linear",
        help="projection of the student embedding to the teacher's width (none: widths must match)",
    )
    g.add_argument(
        "--head-init",
        choices=("lstsq", "random"),
        default="lstsq",
        help="lstsq: ridge least-squares fit of student to teacher embeddings on --head-init-samples sentences",
    )
    g.add_argument("--head-init-samples", type=int, default=2000)
    config_output.add_distill_output_flags(g)
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument(
        "--prefill-queue",
        action="store_true",
        help="fill the CKD queue with random unit vectors before step 1 (benchmarks: a long run's "
        "steady-state step time from the start)",
    )
    return parser


def finetune_parser() -> Parser:
    parser = Parser(
        prog="finetune.py",
        description="Stage 2: supervised contrastive fine-tuning (SimCSE) of a "
        "student on NLI triplets (anchor, entailment, contradiction).",
    )
    _common(parser, "finetune")
    g = parser.add_argument_group("model, data and loss")
    g.add_argument(
        "--student",
        default=str(Path("runs") / "distill" / "final"),
        help="student folder (a stage-1 final model), fetched name or hub id",
    )
    g.add_argument("--keep-layers", type=int, nargs="+", metavar="I", help="keep only these student layers")
    g.add_argument("--nli", nargs="+", type=Path, help="sent0,sent1,hard_neg CSV files (default: the shared SNLI ones)")
    g.add_argument("--max-triplets", type=int, default=0, help="use only the first N triplets (0: all)")
    g.add_argument("--temperature", type=float, default=0.05)
    g.add_argument("--learnable-temperature", action="store_true")
    g.add_argument("--no-hard-negatives", action="store_true", help="positives only as candidates")
    g.add_argument("--lr", type=float, default=5e-5)
    config_output.add_finetune_output_flags(g)
    return parser


def make_shards_parser() -> Parser:
    from ..data.corpus import FORMATS_HELP

    parser = Parser(
        prog="make_shards.py",
        description="Turn a corpus (text, JSONL, Parquet, a datasets folder) into shuffled WebDataset shards + "
        "index.json, in bounded memory. Empty, duplicate, filtered and undecodable rows are dropped and counted; "
        "text is never truncated.",
    )
    parser.add_argument("--corpus", help=f"{FORMATS_HELP} (default: <data root>/{DEFAULT_CORPUS})")
    parser.add_argument(
        "--text-field", default="text", help="JSONL field / Parquet or datasets column holding the text (default text)"
    )
    parser.add_argument("--min-chars", type=int, default=0, help="drop sentences shorter than this (counted)")
    parser.add_argument("--max-chars", type=int, help="drop sentences longer than this (counted; never truncated)")
    parser.add_argument(
        "--bad-rows",
        choices=("stop", "skip"),
        default="stop",
        help="a row that is not text (null, a number, a missing field, a line that is not JSON): stop with one "
        "line naming the file and row, or drop it and count it",
    )
    parser.add_argument(
        "--shuffle-rows",
        type=int,
        default=1_000_000,
        help="sentences held in memory while shuffling (default 1,000,000, ~150 MB); a larger corpus is "
        "shuffled through temporary buckets in --out",
    )
    add_data_root(parser)
    parser.add_argument("--out", required=True, type=Path, help="shard folder to create")
    parser.add_argument(
        "--limit", type=int, help="keep only the first N usable sentences (a uniform sample of a shuffled corpus)"
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="sentences per shard (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards already in --out")
    return parser


DEFAULT_CORPUS = "wiki/wiki_en_sentences_1m.txt.gz"


def add_profile_flag(parser, unit: str, folder: str) -> None:
    parser.add_argument(
        "--profile",
        type=profile_window,
        metavar="FIRST:LAST",
        help=f"torch.profiler over {unit}s FIRST+1 to LAST (e.g. 20:25): a Chrome trace and a table of the ops that "
        f"took the most time, per rank, in {folder}/profile/",
    )


def cache_teacher_parser() -> Parser:
    parser = Parser(
        prog="cache_teacher.py",
        description="Embed every sentence of a shard folder with the teacher "
        "once (ZeRO-3 across the ranks) into new shards holding the sentences with their fp16 teacher "
        "embeddings; distill.py then skips the teacher. Rerun the same command to continue a cut-short pass.",
    )
    parser.add_argument(
        "--shards",
        type=stream.location,
        required=True,
        help="shard folder made by make_shards.py (or its http(s):// URL, or 'pipe:COMMAND' printing {name})",
    )
    parser.add_argument("--out", type=Path, required=True, help="new shard folder to write")
    config_teacher.add_teacher_flags(parser)
    parser.add_argument("--max-length", type=int, default=128)
    add_precision_flag(parser, "the teacher holds bf16 weights; embeddings are stored as fp16 either way")
    config_teacher.add_cache_batching_flags(parser)
    parser.add_argument("--overwrite", action="store_true")
    add_profile_flag(parser, "sentence group", "<out>")
    add_local_rank(parser)
    return parser


def tokenize_shards_parser() -> Parser:
    parser = Parser(
        prog="tokenize_shards.py",
        description="Store a student's token ids in a shard folder (a new folder: the same sentences, teacher "
        "embeddings where cached, and the ids); stage 1 then pads them into batches instead of tokenising.",
    )
    parser.add_argument(
        "--shards", type=stream.location, required=True, help="shard folder (or its http(s):// URL, or 'pipe:...')"
    )
    parser.add_argument("--student", required=True, help="the student whose tokenizer makes the ids (a folder or name)")
    parser.add_argument("--out", type=Path, required=True, help="new shard folder to write")
    parser.add_argument("--max-length", type=int, default=128, help="the max length stage 1 will use (default 128)")
    parser.add_argument("--workers", type=int, default=1, help="processes tokenising shards at once (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards already in --out")
    return parser


def evaluate_parser() -> Parser:
    from ..evaluation.evaluate import TASKS
    from ..models.encoder import POOLINGS

    parser = Parser(
        prog="evaluate.py",
        description="Score an encoder on the seven STS tasks (cosine, Spearman x100) and write a JSON file.",
    )
    parser.add_argument("model", help="local folder, fetched model name, or hub id")
    add_data_root(parser)
    parser.add_argument("--pooling", choices=POOLINGS, help="override the pooling the model folder records")
    parser.add_argument("--max-length", type=int, help="max tokens per sentence (default: the model's)")
    parser.add_argument("--keep-layers", type=int, nargs="+", metavar="I", help="keep only these layers (0-based)")
    parser.add_argument("--prompt", help="text put before every sentence (default: the folder's default prompt)")
    parser.add_argument("--dim", type=int, metavar="N", help="keep the first N dimensions (Matryoshka), re-normalised")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda where there is one, else cpu)")
    parser.add_argument("--out", type=Path, default=Path("eval_sts.json"), help="JSON file to write")
    parser.add_argument("--label", help="row label in the table (default: the model argument)")
    config_output.add_evaluate_output_flags(parser)
    return parser


def parse(parser: Parser, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.config:
        if not args.config.is_file():
            raise UserError(f"--config {args.config}: no such file")
        try:
            values = json.loads(args.config.read_text())
        except ValueError as err:
            raise UserError(f"--config {args.config} is not valid JSON ({err})") from None
        known = {a.dest for a in parser._actions}
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"--config {args.config}: unknown key(s) {', '.join(unknown)}; keys are flag names")
        for action in parser._actions:  # path-typed flags from the file are paths too
            if action.dest in values and action.type is Path and values[action.dest] is not None:
                values[action.dest] = (
                    [Path(v) for v in values[action.dest]]
                    if isinstance(values[action.dest], list)
                    else Path(values[action.dest])
                )
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
    check_common(args)
    return args


def check_common(args) -> None:
    positive = ("max_length", "batch_size", "log_every")
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.epochs <= 0 and args.max_steps <= 0:
        raise UserError("--epochs must be positive (or give --max-steps)")
    if not 0 <= args.warmup_ratio < 1:
        raise UserError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.logit_scale_lr is not None:
        if args.logit_scale_lr <= 0:
            raise UserError(f"--logit-scale-lr must be positive, got {args.logit_scale_lr}")
        if hasattr(args, "loss") and (args.loss != "ckd" or args.fixed_logit_scale):
            raise UserError(
                "--logit-scale-lr: this run learns no logit scale (it needs --loss ckd without "
                "--fixed-logit-scale); drop the flag"
            )
        if hasattr(args, "learnable_temperature") and not args.learnable_temperature:
            raise UserError(
                "--logit-scale-lr: this run learns no temperature; add --learnable-temperature or drop the flag"
            )
    matryoshka_weights(args.matryoshka_dims, args.matryoshka_weights)
    if args.select == "best" and args.eval_every <= 0:
        raise UserError("--select best needs --eval-every > 0 (the best is chosen by STS-B dev Spearman)")
    from ..cluster.ds_config import load_ds_config

    for flag in ("ds_config", "teacher_ds_config"):
        if getattr(args, flag, None) is not None:
            load_ds_config(getattr(args, flag))  # missing, not JSON, unknown keys: one line, before any work
    if args.resume not in (None, "", "auto") and not Path(args.resume).is_dir():
        raise UserError(f"--resume {args.resume}: no such checkpoint folder (or use --resume auto)")
