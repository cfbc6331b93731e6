"""Flags about the student's output space, for training and scoring: its stage-1 head kept (vectors in the
teacher's space), Matryoshka widths (every prefix of the embedding trained to be usable), and scoring a student
against its teacher (one side of every pair each)."""

from pathlib import Path

STUDENT_HEAD = {
    "frozen": "the loss is on the encoder's own output; the head goes into the saved model unchanged",
    "through": "the loss is on the head's output; the head trains with the encoder",
    "drop": "the head is left out; the saved model returns the encoder's own output",
}


def add_matryoshka_flags(group, what: str) -> None:
    group.add_argument(
        "--matryoshka-dims",
        type=int,
        nargs="+",
        metavar="N",
        help=f"train every prefix of these widths of the student's embedding ({what}); the largest must be the "
        "student's full width, e.g. 384 256 128 64",
    )
    group.add_argument(
        "--matryoshka-weights",
        type=float,
        nargs="+",
        metavar="W",
        help="weight of each width's loss, in the order of --matryoshka-dims (default: 1 each)",
    )


def add_distill_output_flags(group) -> None:
    group.add_argument(
        "--keep-head",
        action="store_true",
        help="save the projection head with the student (a Dense module before Normalize): the saved model "
        "returns vectors in the teacher's space, to query an index the teacher built",
    )
    add_matryoshka_flags(group, "CKD or MSE-KD through a head per width, against the full teacher embedding")


def add_finetune_output_flags(group) -> None:
    group.add_argument(
        "--student-head",
        choices=tuple(STUDENT_HEAD),
        default="frozen",
        help="a student saved with its stage-1 head (--keep-head): "
        + "; ".join(f"{k}: {v}" for k, v in STUDENT_HEAD.items())
        + " (default frozen)",
    )
    add_matryoshka_flags(group, "the supervised contrastive loss on each prefix")


def add_evaluate_output_flags(parser) -> None:
    parser.add_argument(
        "--no-head", action="store_true", help="score the encoder's own output, leaving out a Dense head it has"
    )
    parser.add_argument(
        "--dims",
        type=int,
        nargs="+",
        metavar="N",
        help="also score the first N dimensions of the embeddings (cosine re-normalises), e.g. 384 256 128 64; "
        "the sentences are embedded once",
    )
    parser.add_argument(
        "--against-teacher",
        metavar="TEACHER",
        help="also score asymmetric use: one sentence of every pair embedded by the model, the other by this "
        "teacher, both ways round, averaged (the model must return the teacher's width: --keep-head)",
    )
    parser.add_argument(
        "--teacher-cache",
        type=Path,
        help="file keeping the teacher's STS embeddings between evaluations (made on first use)",
    )
