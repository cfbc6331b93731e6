"""Submit the whole DisCo pipeline to SLURM with Submitit, one job per stage, chained with afterok:

    shards -> teacher cache -> distill (CKD) -> fine-tune -> evaluate

    python launchers/submit.py                                  # small default recipe, 2 CPU ranks per stage
    python launchers/submit.py --nodes 2 --tasks-per-node 8 --gpus-per-node 8 --cpus-per-task 8 \\
        --sentences 1000000 --distill-args "--batch-size 512" --partition gpu
    python launchers/submit.py --dry-run                        # print what would be submitted
    python launchers/submit.py --local                          # the same through Submitit's LocalExecutor

The training stages requeue themselves on the pre-timeout signal and resume from their checkpoint.
With --wait (the default for --local) it follows the chain and reports each stage; a failed stage stops
the chain and its error is printed here.
"""
import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from disco_dist.config import Parser  # noqa: E402
from disco_dist.errors import UserError, exit_on_user_error  # noqa: E402
from disco_dist.pipeline import LAUNCHERS, Resources, Stage, submit, wait_for  # noqa: E402


def build_stages(args) -> list:
    run = args.run_dir.resolve()
    shards, cached = run / "shards", run / "shards-teacher"
    common = ["--data-root", args.data_root] if args.data_root else []
    training = Resources(args.nodes, args.tasks_per_node, args.cpus_per_task, args.gpus_per_node, args.time,
                         args.partition)
    keep = ["--keep-layers", *args.keep_layers] if args.keep_layers else []
    distill_source = cached if args.teacher_mode == "cached" else shards
    stages = [
        Stage("shards", ["--out", shards, "--limit", args.sentences, "--shard-size", args.shard_size, "--overwrite",
                         *common, *(["--corpus", args.corpus] if args.corpus else [])], training.single()),
        Stage("cache", ["--shards", shards, "--out", cached, "--teacher", args.teacher, "--overwrite"], training),
        Stage("distill", ["--shards", distill_source, "--student", args.student, *keep, "--teacher", args.teacher,
                          "--run-dir", run / "distill", "--resume", "auto", *common, *shlex.split(args.distill_args)],
              training),
        Stage("finetune", ["--student", run / "distill" / "final", "--run-dir", run / "finetune", "--resume", "auto",
                           *common, *shlex.split(args.finetune_args)], training),
        Stage("evaluate", [run / "finetune" / "final", "--out", run / "eval_sts.json", "--label", "DisCo student",
                           *common], training.single()),
    ]
    if args.teacher_mode != "cached":
        stages = [s for s in stages if s.name != "cache"]
    return [s for s in stages if s.name not in args.skip]


@exit_on_user_error
def main(argv=None):
    parser = Parser(prog="submit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / "pipeline")
    parser.add_argument("--corpus", help="text corpus (default: the shared Wikipedia sentences)")
    parser.add_argument("--data-root", help="data folder (default: $DISCO_DATA_ROOT or ../shared/data)")
    parser.add_argument("--sentences", type=int, default=2000, help="distillation sentences (corpus prefix)")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--teacher", default="all-mpnet-base-v2")
    parser.add_argument("--student", default="all-MiniLM-L6-v2")
    parser.add_argument("--keep-layers", nargs="+", default=["0", "2", "5"], help="student layers to keep "
                        "(give 'all' to keep every layer)")
    parser.add_argument("--teacher-mode", choices=("cached", "online"), default="cached")
    parser.add_argument("--distill-args", default="--loss ckd --logit-scale 20 --queue-size 1024 --batch-size 32 "
                        "--epochs 2", help="more flags for distill.py (one quoted string)")
    parser.add_argument("--finetune-args", default="--max-triplets 2048 --batch-size 32 --eval-every 8",
                        help="more flags for finetune.py (one quoted string)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("shards", "cache", "distill", "finetune", "evaluate"),
                        help="stages to leave out (their outputs must exist)")
    g = parser.add_argument_group("resources (training stages; shards and evaluate get one task)")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--tasks-per-node", type=int, default=2, help="ranks per node: one per GPU, or CPU ranks")
    g.add_argument("--cpus-per-task", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0)
    g.add_argument("--time", type=int, default=120, help="minutes per job (training jobs requeue past it)")
    g.add_argument("--partition")
    parser.add_argument("--local", action="store_true", help="run through Submitit's LocalExecutor on this machine")
    parser.add_argument("--dry-run", action="store_true", help="print the stages and their commands, submit nothing")
    parser.add_argument("--no-wait", dest="wait", action="store_false", help="submit and return (SLURM only)")
    args = parser.parse_args(argv)
    if args.keep_layers == ["all"]:
        args.keep_layers = []

    stages = build_stages(args)
    if args.dry_run:
        for stage in stages:
            r = stage.resources
            print(f"{stage.name:<9} nodes={r.nodes} tasks/node={r.tasks_per_node} cpus/task={r.cpus_per_task} "
                  f"gpus/node={r.gpus_per_node} time={r.timeout_min}min  "
                  f"launchers/{LAUNCHERS[stage.name]} {' '.join(shlex.quote(str(a)) for a in stage.argv)}")
        return
    log_folder = args.run_dir.resolve() / "submitit" / "%j"
    submit(stages, log_folder, args.local, log=lambda line: print(line, flush=True))
    print(f"run folder: {args.run_dir.resolve()}\nlogs: {log_folder.parent}\n"
          f"TensorBoard: tensorboard --logdir {args.run_dir.resolve()} --host 127.0.0.1", flush=True)
    if args.wait or args.local:
        for stage in stages:
            try:
                wait_for(stage, log=lambda line: print(line, flush=True))
            except UserError:
                for later in stages[stages.index(stage) + 1:]:
                    if later.job is not None:
                        later.job.cancel(check=False)
                raise
        print(f"pipeline finished: {args.run_dir.resolve() / 'eval_sts.json'}")


if __name__ == "__main__":
    main()
