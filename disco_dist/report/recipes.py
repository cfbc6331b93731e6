"""Recipes and running them: one JSON file per student under `recipes/`, and what turns (recipe, method)
into runs, an evaluation and a row for docs/results.json (results.py records and judges it).

Methods, as in the paper's comparison:
    init     the student as initialised (kept layers), no training
    mse      stage 1 with MSE-KD;              ckd      stage 1 with CKD
    disco    CKD, then NLI fine-tuning;        mse+ft   MSE-KD, then NLI fine-tuning
    ft       NLI fine-tuning from the initialisation (the same-size model that never saw the teacher)

Every step is skipped when its output exists and resumes (`--resume auto`) when it was cut short, so a
long chain runs in parts. Model selection uses STS-B dev only (`--select best`); the seven test sets are
only ever scored at the end.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from ..core.errors import UserError
from ..core.files import RECIPES, REPO_ROOT

NOISE = ("[INFO]", "[real_accelerator.py", "[runner.py", "Warning:", "  return ", "Loading weights")


METHODS = ("init", "mse", "ckd", "disco", "mse+ft", "ft")
METHOD_NAMES = {
    "init": "initialisation",
    "mse": "MSE-KD",
    "ckd": "CKD",
    "disco": "CKD + FT (DisCo)",
    "mse+ft": "MSE-KD + FT",
    "ft": "FT only",
}


def run_command_logged(name: str, *args, ranks: int = 0, log=print) -> None:
    """Run one of the pipeline's commands (as `ranks` ranks under the deepspeed launcher, or one process), its
    command line printed first and its output streamed, noise dropped; a failure is one line."""
    from ..cluster.distributed import command_argv, threads_per_rank

    cmd = command_argv(name, *args, ranks=ranks)
    log("\n$ " + " ".join(cmd))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if ranks and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = threads_per_rank(ranks)
    with subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        for line in process.stdout:
            if line.strip() and not any(noise in line for noise in NOISE):
                print(line, end="", flush=True)
    if process.returncode != 0:
        raise UserError(f"step failed (exit {process.returncode}): {' '.join(cmd)}")


def evaluation(model, out: Path, label: str, extra=()) -> dict:
    """The seven-task scores of `model`, from `out` if it was scored before."""
    return evaluation_record(model, out, label, extra)["scores"]


def evaluation_record(model, out: Path, label: str, extra=()) -> dict:
    """evaluate.py's whole record for `model` (scores, and what `extra` flags add), from `out` if made before."""
    if not Path(out).exists():
        run_command_logged("evaluate", model, "--out", out, "--label", label, "--batch-size", 128, *extra)
    return json.loads(Path(out).read_text())


def has_head(folder: Path) -> bool:
    """Whether a saved model folder carries a Dense head (distill.py --keep-head)."""
    modules = Path(folder) / "modules.json"
    return modules.is_file() and any(m["type"].endswith("Dense") for m in json.loads(modules.read_text()))


def load_recipe(name: str, _seen=()) -> dict:
    """A recipe by name or path. A variant names a `base` recipe and only the flags it changes; its runs get a
    folder of their own (its label) while its rows stay under the base's student, marked with the variant."""
    path = Path(name) if name.endswith(".json") else RECIPES / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.json")))
        raise UserError(f"recipe {name}: no file {path}; known recipes: {known}")
    if path.resolve() in _seen:
        raise UserError(f"recipe {_seen[0]}: its chain of bases comes back to {path}; give it a base without one")
    recipe = json.loads(path.read_text())
    recipe.setdefault("label", path.stem)
    if "base" in recipe:
        base = load_recipe(recipe["base"], (*_seen, path.resolve()))
        # a variant that changes only what follows stage 1 reuses its base's stage-1 runs
        own_stage1 = any(key in recipe for key in ("distill", "student", "keep_layers"))
        recipe = {
            **base,
            **recipe,
            "variant": recipe["label"],
            "student_label": base["student_label"],
            "distill_label": recipe["label"] if own_stage1 else base["distill_label"],
            **{part: {**base.get(part, {}), **recipe.get(part, {})} for part in ("distill", "finetune", "evaluate")},
        }
    recipe.setdefault("student_label", recipe["label"])
    recipe.setdefault("distill_label", recipe["label"])
    return recipe


def flags(options: dict) -> list:
    out = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:  # 0 is a value (0 == False in Python)
            out += [flag, *(value if isinstance(value, list) else [value])]
    return out


class Reproduction:
    """One student's runs under `<run_root>/<label>/` (`.../<label>/seed-N/` for a seed other than 0): distill-mse,
    distill-ckd, ft-from-init, ft-after-mse, ft-after-ckd, each with its run folder, final model and eval JSON.
    The seed sets the data order, the head's initialisation sample and the dropout of both stages."""

    def __init__(self, recipe: dict, run_root: Path, shards: Path, ranks: int, seed: int = 0):
        self.recipe, self.shards, self.ranks, self.seed = recipe, Path(shards), ranks, seed
        self.teacher_cache = Path(run_root) / "teacher-sts-{}.pt"  # one per teacher, shared by every recipe
        seed_dir = f"seed-{seed}" if seed else ""
        self.root = Path(run_root) / recipe["label"] / seed_dir
        self.stage1_root = Path(run_root) / recipe["distill_label"] / seed_dir
        self.keep = ["--keep-layers", *recipe["keep_layers"]] if recipe.get("keep_layers") else []
        self.seeded = ["--seed", seed] if seed else []

    def distilled(self, loss: str) -> Path:
        run_dir = self.stage1_root / f"distill-{loss}"
        if not (run_dir / "train_summary.json").exists():
            if not (self.shards / "index.json").exists():
                raise UserError(
                    f"{self.shards} holds no finished teacher cache; make it with "
                    "`deepspeed --num_gpus 2 launchers/cache_teacher.py --shards ... --out ...`"
                )
            run_command_logged(
                "distill",
                "--shards",
                self.shards,
                "--student",
                self.recipe["student"],
                *self.keep,
                "--run-dir",
                run_dir,
                "--loss",
                loss,
                *flags(self.recipe["distill"]),
                *self.seeded,
                "--resume",
                "auto",
                ranks=self.ranks,
            )
        return run_dir

    def finetuned(self, start: str, name: str, keep: list) -> Path:
        run_dir = self.root / name
        if not (run_dir / "train_summary.json").exists():
            run_command_logged(
                "finetune",
                "--student",
                start,
                *keep,
                "--run-dir",
                run_dir,
                *flags(self.recipe["finetune"]),
                *self.seeded,
                "--resume",
                "auto",
                ranks=self.ranks,
            )
        return run_dir

    def runs(self, method: str) -> list:
        """The run folders of `method`, running what is missing; the last one holds the model to score."""
        if method == "init":
            return []
        if method == "ft":
            return [self.finetuned(self.recipe["student"], "ft-from-init", self.keep)]
        loss = "ckd" if method in ("ckd", "disco") else "mse"
        distilled = self.distilled(loss)
        if method in ("mse", "ckd"):
            return [distilled]
        return [distilled, self.finetuned(str(distilled / "final"), f"ft-after-{loss}", [])]

    def row(self, method: str, command: str) -> dict:
        from ..core.hardware import hardware

        if method not in METHODS:
            raise UserError(f"method {method!r} is not one of {', '.join(METHODS)}")
        runs = self.runs(method)
        label = f"{self.recipe['label']} {method}" + (f" seed {self.seed}" if self.seed else "")
        options = self.recipe.get("evaluate", {})
        dims = ["--dims", *options["dims"]] if options.get("dims") else []
        extra = {}
        if runs:
            scored, final = runs[-1] / "eval_sts.json", runs[-1] / "final"
            headed = has_head(final)  # every row's scores are the encoder's own output; the head's come beside
            record = evaluation_record(final, scored, label, [*dims, *(["--no-head"] if headed else [])])
            if headed:
                teacher = options.get("against_teacher")
                cache = ["--teacher-cache", str(self.teacher_cache).format(teacher)] if teacher else []
                with_head = evaluation_record(
                    final, runs[-1] / "eval_sts_head.json", label + " with head", [*against(teacher), *cache]
                )
                kept = ("speed", "asymmetric", "teacher_scores")  # the head's scores under their own name
                extra = {
                    "with_head": {
                        "head_scores": with_head["scores"],
                        **{k: with_head[k] for k in kept if k in with_head},
                    }
                }
        else:
            scored = self.root / "init" / "eval_sts.json"
            record = evaluation_record(self.recipe["student"], scored, label, [*self.keep, *dims])
        scores = record["scores"]
        summaries = {run_dir: json.loads((run_dir / "train_summary.json").read_text()) for run_dir in runs}
        # the row's wall time from the records of its steps, so a re-run that finds them done does not change it
        seconds = json.loads(scored.read_text())["seconds"] + sum(s["seconds"] for s in summaries.values())
        row = {
            "model": self.recipe["name"],
            "student": self.recipe["student_label"],
            "method": method,
            "scores": {task: round(value, 2) for task, value in scores.items()},
            "command": command,
            "hardware": hardware(),
            "wall_seconds": round(seconds, 1),
        }
        if "variant" in self.recipe:
            row["variant"] = self.recipe["variant"]
        if self.seed:
            row["seed"] = self.seed
        if record.get("scores_by_dim"):
            row["scores_by_dim"] = _rounded_scores(record["scores_by_dim"])
        row.update(_rounded_scores(extra))
        for run_dir, summary in summaries.items():
            config = json.loads((run_dir / "config.json").read_text())
            stage = config["stage"]
            row[stage] = {
                "run_dir": str(run_dir),
                "steps": summary["steps"],
                "seconds": summary["seconds"],
                "world_size": summary["world_size"],
                "best_stsb_dev": _rounded(summary.get("best_dev")),
                "lr": config["lr"],
                "batch_size_per_rank": config["batch_size"],
                "epochs": config["epochs"],
            }
            if stage == "distill":
                row[stage].update(
                    sentences=json.loads((Path(config["shards"]) / "index.json").read_text())["total"],
                    loss=config["loss"],
                    queue_size=config["queue_size"],
                    final_logit_scale=_rounded(summary.get("logit_scale")),
                )
            else:
                row[stage].update(
                    final_temperature=_rounded(summary.get("temperature"), 4), triplets_max=config["max_triplets"]
                )
        return row


def against(teacher) -> list:
    return ["--against-teacher", teacher] if teacher else []


def _rounded_scores(value):
    """Scores (nested dicts of floats) rounded to 2 decimals, as the rows keep them."""
    if isinstance(value, dict):
        return {key: _rounded_scores(v) for key, v in value.items()}
    return round(value, 2) if isinstance(value, float) else value


def _rounded(value, digits=2):
    return None if value is None else round(value, digits)


def print_recipe(argv: list) -> None:
    """`python -m disco_dist.report.recipes NAME KEY`: one value of a recipe (a list as words), for shell scripts
    (slurm/*.sbatch take their defaults from the demo recipe so). Imports nothing heavy."""
    if len(argv) != 2:
        raise UserError("usage: python -m disco_dist.report.recipes RECIPE KEY")
    value = load_recipe(argv[0]).get(argv[1])
    if value is None:
        raise UserError(f"recipe {argv[0]} has no {argv[1]!r}")
    print(" ".join(map(str, value)) if isinstance(value, list) else value)


if __name__ == "__main__":
    from ..core.errors import exit_on_user_error

    exit_on_user_error(print_recipe)(sys.argv[1:])
