"""Submit the whole DisCo pipeline to SLURM with Submitit, one SLURM job per command, chained with afterok:

    shards -> teacher cache -> distill (CKD) -> fine-tune -> evaluate

    python launchers/submit.py                                  # the demo recipe (recipes/demo.json), 2 CPU ranks
    python launchers/submit.py --nodes 2 --tasks-per-node 8 --gpus-per-node 8 --cpus-per-task 8 \\
        --sentences 1000000 --distill-args "--batch-size 512" --partition gpu
    python launchers/submit.py --dry-run                        # print what would be submitted
    python launchers/submit.py --local                          # the same through Submitit's LocalExecutor

The training jobs requeue themselves on the pre-timeout signal and resume from their checkpoint.
With --wait (the default for --local) it follows the chain and reports each job; a failed job stops
the chain and its error is printed here.
"""

import argparse
import shlex
from pathlib import Path

from disco_dist.cli.config import Parser, add_data_root
from disco_dist.cli.pipeline import build_jobs, follow, submit
from disco_dist.core.errors import exit_on_user_error
from disco_dist.report.recipes import flags, load_recipe


@exit_on_user_error
def main(argv=None):
    parser = Parser(prog="submit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo = load_recipe("demo")
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / "pipeline")
    parser.add_argument(
        "--corpus", help="text, JSONL, Parquet or datasets corpus (default: the shared Wikipedia sentences)"
    )
    parser.add_argument(
        "--shards-args",
        default="",
        help="more flags for make_shards.py (one quoted string), e.g. '--text-field body --min-chars 20'",
    )
    add_data_root(parser)
    parser.add_argument(
        "--sentences", type=int, default=demo["sentences"], help="distillation sentences (corpus prefix)"
    )
    parser.add_argument("--shard-size", type=int, default=demo["shard_size"])
    parser.add_argument("--teacher", default=demo["teacher"])
    parser.add_argument("--student", default=demo["student"])
    parser.add_argument(
        "--keep-layers",
        nargs="+",
        default=[str(i) for i in demo["keep_layers"]],
        help="student layers to keep (give 'all' to keep every layer)",
    )
    parser.add_argument("--teacher-mode", choices=("cached", "online"), default="cached")
    parser.add_argument(
        "--distill-args",
        default=shlex.join(map(str, flags(demo["distill"]))),
        help="flags for distill.py (one quoted string; default: the demo recipe's, recipes/demo.json)",
    )
    parser.add_argument(
        "--finetune-args",
        default=shlex.join(map(str, flags(demo["finetune"]))),
        help="flags for finetune.py (one quoted string; default: the demo recipe's)",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=("shards", "cache", "distill", "finetune", "evaluate"),
        help="jobs to leave out (their outputs must exist)",
    )
    g = parser.add_argument_group("resources (training jobs; shards and evaluate get one task)")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--tasks-per-node", type=int, default=2, help="ranks per node: one per GPU, or CPU ranks")
    g.add_argument("--cpus-per-task", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0)
    g.add_argument("--time", type=int, default=120, help="minutes per job (training jobs requeue past it)")
    g.add_argument("--partition")
    parser.add_argument("--local", action="store_true", help="run through Submitit's LocalExecutor on this machine")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs and their commands, submit nothing")
    parser.add_argument("--no-wait", dest="wait", action="store_false", help="submit and return (SLURM only)")
    args = parser.parse_args(argv)
    if args.keep_layers == ["all"]:
        args.keep_layers = []

    jobs = build_jobs(args)
    if args.dry_run:
        print("\n".join(job.describe() for job in jobs))
        return
    log_folder = args.run_dir.resolve() / "submitit" / "%j"
    log = lambda line: print(line, flush=True)  # noqa: E731
    submit(jobs, log_folder, args.local, log=log)
    print(
        f"run folder: {args.run_dir.resolve()}\nlogs: {log_folder.parent}\n"
        f"TensorBoard: tensorboard --logdir {args.run_dir.resolve()} --host 127.0.0.1",
        flush=True,
    )
    if args.wait or args.local:
        follow(jobs, log)
        print(f"pipeline finished: {args.run_dir.resolve() / 'eval_sts.json'}")


if __name__ == "__main__":
    main()
