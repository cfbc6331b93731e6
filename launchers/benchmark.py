"""Speed benchmarks, each a ratio taken side by side on this machine (see docs/benchmarks.md); prints a table
and writes the rows to JSON (rows of other devices in that file are kept).

    python launchers/benchmark.py                        # every row, CPU sizes (about 35 min on 2 cores)
    python launchers/benchmark.py --gpu                  # rows 1-3 in bf16 on one GPU, GPU sizes (< 8 min)
    python launchers/benchmark.py --parts st_training mfu --repeats 1
    python launchers/benchmark.py --parts bf16_training --bf16-shards runs/fast/shards-teacher   # ~12 min
    python launchers/benchmark.py --parts time_to_student_min                                  # ~30 min

On a GPU the student trains in bf16 (autocast) with the padding-free forward (SDPA attention); the
st_training row then records the run's peak GPU memory. st_training and teacher_encode also time the ceiling, a
plain PyTorch loop on the same model, sentences and precision (disco_dist/bench/ceiling.py), and record disco-dist's
rate as a fraction of it (`x_ceiling`).
"""

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from disco_dist.bench.benchmark import Benchmark, Settings
from disco_dist.bench.benchmark_rows import TARGETS, format_table, merge_json
from disco_dist.cli.config import Parser
from disco_dist.cluster.distributed import exit_process
from disco_dist.core.errors import UserError, exit_on_user_error

GPU_SIZES = {
    "device": "cuda",
    "precision": "bf16",
    "teacher_sentences": 5000,
    "batch_size": 128,
    "steps": 50,
    "warmup_steps": 10,
    "parts": ("st_training", "teacher_encode", "mfu"),
    "mfu_ranks": 0,  # one GPU: the mfu row is st_training's one process
    "ceiling_batch_sizes": (256, 1024, 4096),  # the plain loop beside the row's batch, up to what fits
}


def run_time_to_student(work_dir: Path) -> str:
    """A fresh `demo.py --recipe S2-fast` run in work_dir (about 30 min on 2 cores); its folder."""
    run_dir = work_dir / "time-to-student"
    shutil.rmtree(run_dir, ignore_errors=True)
    demo = Path(__file__).resolve().parent / "demo.py"
    command = [sys.executable, str(demo), "--recipe", "S2-fast", "--run-dir", str(run_dir)]
    if subprocess.run(command).returncode != 0:
        raise UserError(f"time_to_student_min: the run failed (its output is above): {shlex.join(command)}")
    return str(run_dir)


@exit_on_user_error
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = Parser(prog="benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    parser.add_argument("--parts", nargs="+", choices=list(TARGETS), default=list(defaults.parts))
    parser.add_argument("--student", default=defaults.student)
    parser.add_argument("--teacher", default=defaults.teacher)
    parser.add_argument("--corpus", help="sentences to use (default: the shared Wikipedia 100k file)")
    parser.add_argument(
        "--teacher-sentences",
        type=int,
        help=f"sentences both teacher sides embed, then the "
        f"training data (default {defaults.teacher_sentences}; --gpu: {GPU_SIZES['teacher_sentences']})",
    )
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int, help="timed training steps after the warm-up")
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--ckd-steps", type=int)
    parser.add_argument("--queue-size", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--st-batch-sizes", type=int, nargs="+", help="SentenceTransformer.encode batch sizes to try")
    parser.add_argument(
        "--ceiling-batch-sizes",
        type=int,
        nargs="+",
        help="st_training: the plain PyTorch loop's batch sizes beside --batch-size (--gpu: 256 1024 4096)",
    )
    parser.add_argument("--bf16-steps", type=int, help="bf16_training: steps of each side (default 200)")
    parser.add_argument(
        "--bf16-shards", help="bf16_training: teacher-cached shards to train on (required by that part)"
    )
    parser.add_argument(
        "--time-to-student-run",
        help="time_to_student_min: read this finished `demo.py --recipe S2-fast` run (default: run one, ~30 min)",
    )
    parser.add_argument("--gpu", action="store_true", help="one GPU, bf16, the GPU sizes")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], help="every part's precision, both sides (default fp32; --gpu: bf16)"
    )
    parser.add_argument(
        "--mfu-ranks",
        type=int,
        help=f"mfu: ranks of the row's training run, one thread each here (default {defaults.mfu_ranks}; "
        "0: st_training's one process)",
    )
    parser.add_argument(
        "--teacher-ds-config",
        dest="zero3_config",
        help="zero3_vs_replicated: the ZeRO-3 side's DeepSpeed config (default ds_configs/teacher_zero3.json)",
    )
    parser.add_argument(
        "--teacher-token-budget",
        type=int,
        help="teacher_encode: the cache pass's token budget (default: cache_teacher.py's; 0: fixed batches)",
    )
    parser.add_argument("--work-dir", default=defaults.work_dir)
    parser.add_argument("--out", type=Path, help="JSON file the rows are merged into (default docs/benchmarks.json)")
    args = parser.parse_args(argv)

    values = dict(GPU_SIZES) if args.gpu else {}
    for name in (
        "student",
        "teacher",
        "corpus",
        "teacher_sentences",
        "batch_size",
        "steps",
        "warmup_steps",
        "ckd_steps",
        "queue_size",
        "repeats",
        "work_dir",
        "bf16_steps",
        "bf16_shards",
        "time_to_student_run",
        "zero3_config",
        "teacher_token_budget",
        "precision",
        "mfu_ranks",
    ):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.st_batch_sizes:
        values["st_batch_sizes"] = tuple(args.st_batch_sizes)
    if args.ceiling_batch_sizes:
        values["ceiling_batch_sizes"] = tuple(args.ceiling_batch_sizes)
    if "--parts" in argv or not args.gpu:
        values["parts"] = tuple(args.parts)
    mode_defaults = {**vars(defaults), **(GPU_SIZES if args.gpu else {}), "zero3_config": None}
    variants = {"--teacher-ds-config": "zero3_config", "--teacher-token-budget": "teacher_token_budget"}
    variants.update({"--precision": "precision", "--mfu-ranks": "mfu_ranks"})
    variant = next(  # a flag given with a value other than this mode's default
        (flag for flag, name in variants.items() if getattr(args, name) not in (None, mode_defaults[name])), None
    )
    if variant and not args.out:  # a variant's row would replace the default's in docs/benchmarks.json
        raise UserError(
            f"{variant} times a variant: give --out FILE for its row (docs/benchmarks.json keeps the default)"
        )
    if args.mfu_ranks is not None and args.mfu_ranks < 0:
        raise UserError(f"--mfu-ranks {args.mfu_ranks}: give 0 (one process) or a number of ranks")
    args.out = args.out or Path("docs") / "benchmarks.json"
    if values.get("warmup_steps", defaults.warmup_steps) < 2:
        raise UserError("--warmup-steps must be at least 2 (the first logged interval is the warm-up)")
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--gpu: no CUDA device is visible here")
    if "time_to_student_min" in values.get("parts", ()) and not args.time_to_student_run:
        values["time_to_student_run"] = run_time_to_student(Path(values.get("work_dir", defaults.work_dir)))
    settings = Settings(**values, command="python launchers/benchmark.py " + shlex.join(argv))
    rows = Benchmark(settings).run()
    print(format_table(rows))
    merge_json(args.out, rows)
    print(f"rows written to {args.out}")


if __name__ == "__main__":
    main()
    exit_process(0)  # results are printed and written: skip the interpreter teardown (see cluster/distributed.py)
