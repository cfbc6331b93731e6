"""Recipes and the steps of a chain: one JSON file per student under `launchers/recipes/`, and what turns
(recipe, method) into runs, an evaluation and a row of docs/results.json.

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
import platform
import subprocess
import sys
import time
from pathlib import Path

from .config import REPO_ROOT
from .distributed import deepspeed_command, threads_per_rank
from .errors import UserError
from .evaluate import TASKS, write_json_atomic

RECIPES = REPO_ROOT / "launchers" / "recipes"
METHODS = ("init", "mse", "ckd", "disco", "mse+ft", "ft")
NOISE = ("[INFO]", "[real_accelerator.py", "[runner.py", "Warning:", "  return ", "Loading weights")


def run_step(cmd: list, ranks: int | None = None, log=print) -> None:
    """Run one launcher (under the deepspeed launcher with `ranks` ranks), its output streamed, noise dropped."""
    cmd = deepspeed_command(ranks, *cmd) if ranks else [sys.executable, *cmd]
    log("\n$ " + " ".join(str(c) for c in cmd))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if ranks and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = threads_per_rank(ranks)
    with subprocess.Popen([str(c) for c in cmd], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        for line in process.stdout:
            if line.strip() and not any(noise in line for noise in NOISE):
                print(line, end="", flush=True)
    if process.returncode != 0:
        raise UserError(f"step failed (exit {process.returncode}): {' '.join(str(c) for c in cmd)}")


def evaluation(model, out: Path, label: str, extra=()) -> dict:
    """The seven-task scores of `model`, from `out` if it was scored before."""
    if not Path(out).exists():
        run_step(["launchers/evaluate.py", model, "--out", out, "--label", label, "--batch-size", 128, *extra])
    return json.loads(Path(out).read_text())["scores"]


def hardware() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


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
        recipe = {**base, **recipe, "variant": recipe["label"], "student_label": base["student_label"],
                  **{stage: {**base[stage], **recipe.get(stage, {})} for stage in ("distill", "finetune")}}
    recipe.setdefault("student_label", recipe["label"])
    return recipe


def flags(options: dict) -> list:
    out = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value not in (False, None):
            out += [flag, *(value if isinstance(value, list) else [value])]
    return out


class Reproduction:
    """One student's runs under `<run_root>/<label>/`: distill-mse, distill-ckd, ft-from-init, ft-after-mse,
    ft-after-ckd, each with its run folder, final model and eval JSON."""

    def __init__(self, recipe: dict, run_root: Path, shards: Path, ranks: int):
        self.recipe, self.shards, self.ranks = recipe, Path(shards), ranks
        self.root = Path(run_root) / recipe["label"]
        self.keep = ["--keep-layers", *recipe["keep_layers"]] if recipe.get("keep_layers") else []

    def distilled(self, loss: str) -> Path:
        run_dir = self.root / f"distill-{loss}"
        if not (run_dir / "train_summary.json").exists():
            if not (self.shards / "index.json").exists():
                raise UserError(f"{self.shards} holds no finished teacher cache; make it with "
                                "`deepspeed --num_gpus 2 launchers/cache_teacher.py --shards ... --out ...`")
            run_step(["launchers/distill.py", "--shards", self.shards, "--student", self.recipe["student"], *self.keep,
                      "--run-dir", run_dir, "--loss", loss, *flags(self.recipe["distill"]), "--resume", "auto"],
                     self.ranks)
        return run_dir

    def finetuned(self, start: str, name: str, keep: list) -> Path:
        run_dir = self.root / name
        if not (run_dir / "train_summary.json").exists():
            run_step(["launchers/finetune.py", "--student", start, *keep, "--run-dir", run_dir,
                      *flags(self.recipe["finetune"]), "--resume", "auto"], self.ranks)
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
        if method not in METHODS:
            raise UserError(f"method {method!r} is not one of {', '.join(METHODS)}")
        runs = self.runs(method)
        label = f"{self.recipe['label']} {method}"
        if runs:
            scored = runs[-1] / "eval_sts.json"
            scores = evaluation(runs[-1] / "final", scored, label)
        else:
            scored = self.root / "init" / "eval_sts.json"
            scores = evaluation(self.recipe["student"], scored, label, self.keep)
        summaries = {run_dir: json.loads((run_dir / "train_summary.json").read_text()) for run_dir in runs}
        # the row's wall time from the records of its steps, so a re-run that finds them done does not change it
        seconds = json.loads(scored.read_text())["seconds"] + sum(s["seconds"] for s in summaries.values())
        row = {"model": self.recipe["name"], "student": self.recipe["student_label"], "method": method,
               "scores": {task: round(value, 2) for task, value in scores.items()}, "command": command,
               "hardware": hardware(), "wall_seconds": round(seconds, 1)}
        if "variant" in self.recipe:
            row["variant"] = self.recipe["variant"]
        for run_dir, summary in summaries.items():
            config = json.loads((run_dir / "config.json").read_text())
            stage = config["stage"]
            row[stage] = {"run_dir": str(run_dir), "steps": summary["steps"], "seconds": summary["seconds"],
                          "world_size": summary["world_size"], "best_stsb_dev": _rounded(summary.get("best_dev")),
                          "lr": config["lr"], "batch_size_per_rank": config["batch_size"], "epochs": config["epochs"]}
            if stage == "distill":
                row[stage].update(sentences=json.loads((Path(config["shards"]) / "index.json").read_text())["total"],
                                  loss=config["loss"], queue_size=config["queue_size"],
                                  final_logit_scale=_rounded(summary.get("logit_scale")))
            else:
                row[stage].update(final_temperature=_rounded(summary.get("temperature"), 4),
                                  triplets_max=config["max_triplets"])
        return row


def _rounded(value, digits=2):
    return None if value is None else round(value, digits)


def merge_result_row(path: Path, row: dict) -> None:
    """Put `row` into docs/results.json, replacing the row of the same student, method and variant; a variant's
    row follows the recipe's own row of that method."""
    def key(r):
        return r["student"], r["method"], r.get("variant", "")

    content = json.loads(Path(path).read_text()) if Path(path).is_file() else {"rows": []}
    rows = [r for r in content["rows"] if key(r) != key(row)]
    order = {name: i for i, name in enumerate(("teacher", "S1", "S2", "S3"))}
    rows.append(row)
    rows.sort(key=lambda r: (order.get(r["student"], 9), METHODS.index(r["method"]) if r["method"] in METHODS else 9,
                             r.get("variant", "")))
    write_json_atomic(path, {**content, "rows": rows})


def encode_speed(recipe: dict, teacher: str, texts: list, batch_sizes=(1, 128), repeats: int = 3,
                 max_length: int = 128) -> list:
    """Sentences/s of the student and the teacher encoding the same sentences at the same max length, one
    process, alternating the two, medians of `repeats`: the speed column of the results table."""
    import statistics

    import torch

    from .encoder import Encoder

    student = Encoder.from_pretrained(recipe["student"], max_length=max_length, keep=recipe.get("keep_layers"))
    big = Encoder.from_pretrained(teacher, max_length=max_length)
    rows = []
    for batch_size in batch_sizes:
        sample = texts[:max(64, 4 * batch_size)] if batch_size > 1 else texts[:64]
        rates = {"student": [], "teacher": []}
        for model in (student, big):
            model.encode(sample[:batch_size], batch_size=batch_size)  # warm-up
        for _ in range(repeats):
            for name, model in (("student", student), ("teacher", big)):
                start = time.perf_counter()
                with torch.inference_mode():
                    model.encode(sample, batch_size=batch_size)
                rates[name].append(len(sample) / (time.perf_counter() - start))
        s, t = statistics.median(rates["student"]), statistics.median(rates["teacher"])
        rows.append({"student": recipe["label"], "batch_size": batch_size, "sentences": len(sample),
                     "max_length": max_length, "student_sentences_per_s": round(s, 2),
                     "teacher_sentences_per_s": round(t, 2), "speedup": round(s / t, 2)})
    return rows


def merge_speed_rows(path: Path, rows: list) -> None:
    content = json.loads(Path(path).read_text())
    students = {r["student"] for r in rows}
    speed = [r for r in content.get("speed", []) if r["student"] not in students] + rows
    write_json_atomic(path, {**content, "speed": sorted(speed, key=lambda r: (r["student"], r["batch_size"]))})


METHOD_NAMES = {"init": "initialisation", "mse": "MSE-KD", "ckd": "CKD", "disco": "CKD + FT (DisCo)",
                "mse+ft": "MSE-KD + FT", "ft": "FT only"}


def targets(rows: list) -> list:
    """The issue's targets, each as (what, value, goal, met), from whichever rows exist: S1 DisCo within 0.5 of
    the teacher's average, S2 DisCo 2.0 above its initialisation, S3 DisCo at 78.0; CKD at least MSE-KD
    (with and without fine-tuning after it); fine-tuning never lowering the average it started from. Judged on
    the recipes' own rows: a variant's row is shown beside them, never counted for them."""
    avg = {(r["student"], r["method"]): r["scores"]["avg"] for r in rows if "variant" not in r}
    checks = []

    def check(what, key, base, margin=0.0):
        """`key`'s average must reach `base` (another row's average, or a number) plus `margin`."""
        goal = avg.get(base) if isinstance(base, tuple) else base
        if key in avg and goal is not None:
            text = f"≥ {goal:.2f}" + (f" {'+' if margin > 0 else '−'} {abs(margin):.1f}" if margin else "")
            checks.append((what, avg[key], text, avg[key] >= round(goal + margin, 2)))

    check("S1 DisCo ≥ teacher avg − 0.5", ("S1", "disco"), ("teacher", "init"), -0.5)
    check("S2 DisCo ≥ its init + 2.0", ("S2", "disco"), ("S2", "init"), 2.0)
    check("S3 DisCo ≥ 78.0", ("S3", "disco"), 78.0)
    for student in ("S1", "S2", "S3"):
        for better, worse in (("ckd", "mse"), ("disco", "mse+ft"), ("ft", "init"), ("mse+ft", "mse"),
                              ("disco", "ckd")):
            check(f"{student} {METHOD_NAMES[better]} ≥ {METHOD_NAMES[worse]}", (student, better), (student, worse))
    return checks


def _minutes(seconds) -> str:
    return "" if seconds is None else f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def results_markdown(content: dict) -> str:
    """docs/results.json as the tables of docs/results.md: scores with each run's steps, wall time and final
    logit scale; the targets met or missed; encoding speed relative to the teacher."""
    rows = content["rows"]
    init_avg = {r["student"]: r["scores"]["avg"] for r in rows if r["method"] == "init" and "variant" not in r}
    lines = ["| student | method | " + " | ".join(TASKS) + " | avg | Δ init | stage-1 steps, time, final scale "
             "| FT steps, time | row wall time | command |", "|" + "---|" * (len(TASKS) + 8)]
    for r in rows:
        delta = r["scores"]["avg"] - init_avg[r["student"]] if r["student"] in init_avg else None
        distill, finetune = r.get("distill"), r.get("finetune")
        stage1 = f"{distill['steps']}, {_minutes(distill['seconds'])}" if distill else ""
        if distill and distill.get("final_logit_scale") is not None:
            stage1 += f", {distill['final_logit_scale']:.2f}"
        ft = f"{finetune['steps']}, {_minutes(finetune['seconds'])}" if finetune else ""
        name = "teacher" if r["student"] == "teacher" else f"{r['student']}: {r['model']}"
        method = METHOD_NAMES.get(r["method"], r["method"]) + (f" (variant {r['variant']})" if "variant" in r else "")
        lines.append(f"| {name} | {method} | "
                     + " | ".join(f"{r['scores'][t]:.2f}" for t in TASKS)
                     + f" | **{r['scores']['avg']:.2f}** | {'' if delta is None else f'{delta:+.2f}'} | {stage1} "
                       f"| {ft} | {_minutes(r.get('wall_seconds', r.get('seconds')))} | `{r['command']}` |")
    lines += ["", "| run folder | stage | loss | lr | global batch | steps | data | best STS-B dev | final scale "
              "or temperature | wall time |", "|---|---|---|---|---|---|---|---|---|---|"]
    runs = {run["run_dir"]: (stage, run) for r in rows for stage in ("distill", "finetune") if (run := r.get(stage))}
    for run_dir, (stage, run) in runs.items():
        distill = stage == "distill"
        data = f"{run['sentences']:,} sentences" if distill else "all NLI triplets" if not run["triplets_max"] \
            else f"{run['triplets_max']:,} triplets"
        final = run["final_logit_scale"] if distill else run["final_temperature"]
        final = "–" if final is None else final  # MSE-KD has no scale
        lines.append(f"| `{run_dir}` | {stage} | {run['loss'] if distill else 'sup_contrastive'} | {run['lr']} | "
                     f"{run['batch_size_per_rank'] * run['world_size']} | {run['steps']} | {data} | "
                     f"{run['best_stsb_dev']} | {final} | {_minutes(run['seconds'])} |")
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {what} | {value:.2f} | {goal} | {'yes' if met else '**no**'} |"
              for what, value, goal, met in targets(rows)]
    if content.get("speed"):
        lines += ["", "| student | batch | max length | student sent/s | teacher sent/s | speed-up | command |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {s['student']} | {s['batch_size']} | {s['max_length']} | {s['student_sentences_per_s']} | "
                  f"{s['teacher_sentences_per_s']} | {s['speedup']}x | `{s['command']}` |" for s in content["speed"]]
    return "\n".join(lines) + "\n"
