"""The teacher's flags: which teacher and how it is held (distill.py's online mode and cache_teacher.py), and how the
cache pass batches its sentences (cache_teacher.py only: its batches may differ in count between ranks, which an
online teacher under ZeRO-3 cannot allow)."""

from pathlib import Path

from ..core.files import DS_CONFIGS

TEACHER = "all-mpnet-base-v2"


def add_teacher_flags(group) -> None:
    """The teacher, as distill.py (online mode) and cache_teacher.py take it."""
    group.add_argument("--teacher", default=TEACHER, help="teacher: folder, fetched name or hub id")
    group.add_argument(
        "--teacher-ds-config",
        type=Path,
        default=DS_CONFIGS / "teacher_zero3.json",
        help="DeepSpeed config of the teacher (ZeRO stage 3)",
    )
    group.add_argument(
        "--teacher-replicated",
        action="store_true",
        help="every rank holds the whole teacher instead of a ZeRO-3 share: no gathers, so faster where the "
        "teacher fits in each rank's memory (e.g. a 110M-parameter teacher on CPU ranks)",
    )
    group.add_argument(
        "--teacher-batch-size",
        type=int,
        help="sentences per teacher forward (default: 256 on a GPU; on a CPU 64 under ZeRO-3, else 16, and "
        "cache_teacher.py's token budget instead where it applies); distill's online mode embeds several student "
        "batches per call",
    )
    group.add_argument(
        "--teacher-prompt",
        help="text put before every sentence the teacher embeds, e.g. a decoder "
        "embedder's instruction (default: the teacher folder's default prompt, if any; '' for none)",
    )
    group.add_argument(
        "--teacher-dim",
        type=int,
        metavar="N",
        help="keep the first N dimensions of the teacher's "
        "embeddings, re-normalised (Matryoshka-trained teachers; smaller caches)",
    )


def add_cache_batching_flags(parser) -> None:
    """How cache_teacher.py forms teacher batches: sentences sorted by length together, a token budget per forward."""
    parser.add_argument(
        "--sort-group",
        type=int,
        help="sentences length-sorted together into teacher batches (default 4,096; a corpus under 65,536 "
        "sentences: its 16th, so that 16 groups share the work among ranks)",
    )
    parser.add_argument(
        "--teacher-token-budget",
        type=int,
        metavar="N",
        help="fill each teacher forward up to N padded tokens instead of --teacher-batch-size sentences (short "
        "sentences share bigger batches; default: 1,024 on a CPU without ZeRO-3's partitions and without "
        "--teacher-batch-size, else off; 0: off)",
    )
