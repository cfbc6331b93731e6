"""Reproduce one row of the DisCo results table (docs/results.md) with one command, and record it in
docs/results.json. Recipes (student, flags and targets) are the JSON files in recipes/.

    python launchers/reproduce.py S2 ckd          # CKD on the cached teacher shards, then the seven-task STS table
    python launchers/reproduce.py S2 disco        # CKD (reused if done), then NLI fine-tuning
    python launchers/reproduce.py S1 ft           # NLI fine-tuning from the initialisation only
    python launchers/reproduce.py S3 speed        # encoding speed against the teacher at batch 1 and 128
    python launchers/reproduce.py S3-scale10 ckd  # a variant recipe: S3 with the flags S3-scale10.json changes
    python launchers/reproduce.py --table         # docs/results.json as markdown tables, targets met or missed

Methods: init, mse, ckd, disco, mse+ft, ft, speed. Runs go to <run-root>/<student>/ and are skipped when
done or resumed when cut short, so a long row can be run in parts. Choices are made on STS-B dev only.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

from disco_dist.cli.config import Parser
from disco_dist.core.errors import UserError, exit_on_user_error
from disco_dist.report.recipes import METHODS, Reproduction, load_recipe
from disco_dist.report.results import merge_result_row, results_markdown

DEFAULT_SHARDS = Path("runs") / "wiki-100k" / "shards-mpnet"


@exit_on_user_error
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = Parser(prog="reproduce.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "student", nargs="?", help="recipe name (S1, S2, S3, or a variant such as S3-scale10) or a recipe JSON file"
    )
    parser.add_argument("method", nargs="?", choices=[*METHODS, "speed"])
    parser.add_argument("--table", action="store_true", help="print the results file as markdown tables and exit")
    parser.add_argument(
        "--shards",
        type=Path,
        default=DEFAULT_SHARDS,
        help=f"teacher-cached shards for stage 1 (default {DEFAULT_SHARDS})",
    )
    parser.add_argument("--run-root", type=Path, default=Path("runs") / "reproduce")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed (data order, head init sample, dropout); runs of a seed "
        "other than 0 go to <run-root>/<recipe>/seed-N/ and their rows carry the seed",
    )
    parser.add_argument("--ranks", type=int, default=2, help="ranks (CPU processes or GPUs) per training run")
    parser.add_argument("--teacher", default="all-mpnet-base-v2", help="for the speed comparison")
    parser.add_argument("--results", type=Path, default=Path("docs") / "results.json")
    args = parser.parse_args(argv)
    if args.table:
        if not args.results.is_file():
            raise UserError(f"{args.results}: no results file yet; run a row first")
        print(results_markdown(json.loads(args.results.read_text())), end="")
        return
    if not (args.student and args.method):
        parser.error("give a student and a method (e.g. `S2 ckd`), or --table")
    recipe = load_recipe(args.student)
    command = "python launchers/reproduce.py " + shlex.join(argv)
    if args.method == "speed":
        from disco_dist.bench.measure import record_encode_speed

        record_encode_speed(recipe, args.teacher, args.results, command)
        return
    row = Reproduction(recipe, args.run_root, args.shards, args.ranks, args.seed).row(args.method, command)
    merge_result_row(args.results, row)
    print(f"{row['student']} {row['method']}: avg {row['scores']['avg']} -> recorded in {args.results}")


if __name__ == "__main__":
    main()
