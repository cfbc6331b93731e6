"""Submit the whole DisCo pipeline to SLURM with Submitit, one job per stage, chained with afterok:

    shards -> teacher cache -> distill (CKD) -> fine-tune -> evaluate

    python launchers/submit.py                                  # the demo recipe (recipes/demo.json), 2 CPU ranks
    python launchers/submit.py --nodes 2 --tasks-per-node 8 --gpus-per-node 8 --cpus-per-task 8 \\
        --sentences 1000000 --distill-args "--batch-size 512" --partition gpu
    python launchers/submit.py --dry-run                        # print what would be submitted
    python launchers/submit.py --local                          # the same through Submitit's LocalExecutor

The training stages requeue themselves on the pre-timeout signal and resume from their checkpoint.
With --wait (the default for --local) it follows the chain and reports each stage; a failed stage stops
the chain and its error is printed here.
"""

import argparse
from pathlib import Path

from disco_dist.config import Parser, add_data_root
from disco_dist.errors import exit_on_user_error
from disco_dist.pipeline import build_jobs, follow, submit
from disco_dist.recipes import load_recipe


@exit_on_user_error
def main(argv=None):
    parser = Parser(prog="submit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--recipe",
        default="demo",
        help="recipe the defaults and the stages' flags come from (default: recipes/demo.json)",
    )
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / "pipeline")
    parser.add_argument("--corpus", help="text corpus (default: the shared Wikipedia sentences)")
    add_data_root(parser)
    parser.add_argument("--sentences", type=int, help="distillation sentences, a corpus prefix (default: the recipe's)")
    parser.add_argument("--shard-size", type=int, help="sentences per shard (default: the recipe's)")
    parser.add_argument("--teacher", help="default: the recipe's")
    parser.add_argument("--student", help="default: the recipe's")
    parser.add_argument(
        "--keep-layers",
        nargs="+",
        help="student layers to keep (default: the recipe's; give 'all' to keep every layer)",
    )
    parser.add_argument("--teacher-mode", choices=("cached", "online"), default="cached")
    parser.add_argument(
        "--distill-args",
        default="",
        help="more flags for distill.py, after the recipe's (one quoted string; the last value of a flag wins)",
    )
    parser.add_argument("--finetune-args", default="", help="more flags for finetune.py, after the recipe's")
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
    recipe = load_recipe(args.recipe)
    for name in ("sentences", "shard_size", "teacher", "student", "keep_layers"):
        if getattr(args, name) is None:
            setattr(args, name, recipe[name])
    args.keep_layers = [] if args.keep_layers in (["all"], None) else [str(i) for i in args.keep_layers]

    jobs = build_jobs(args, recipe)
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
