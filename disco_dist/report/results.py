"""The results of the reproduction: rows recorded in docs/results.json, the recipes' targets judged met or
missed, and the markdown tables of docs/results.md (`python launchers/reproduce.py --table`)."""

import json
from pathlib import Path

from ..core.files import RECIPES, write_json_atomic
from ..evaluation.evaluate import TASKS
from .recipes import METHOD_NAMES, METHODS


def merge_result_row(path: Path, row: dict) -> None:
    """Put `row` into docs/results.json, replacing the row of the same student, method and variant; a variant's
    row follows the recipe's own row of that method."""

    def key(r):
        return r["student"], r["method"], r.get("variant", ""), r.get("seed", 0)

    content = json.loads(Path(path).read_text()) if Path(path).is_file() else {"rows": []}
    rows = [r for r in content["rows"] if key(r) != key(row)]
    order = {name: i for i, name in enumerate(("teacher", "S1", "S2", "S3"))}
    rows.append(row)
    rows.sort(
        key=lambda r: (
            order.get(r["student"], 9),
            METHODS.index(r["method"]) if r["method"] in METHODS else 9,
            r.get("variant", ""),
            r.get("seed", 0),
        )
    )
    write_json_atomic(path, {**content, "rows": rows})


def merge_speed_rows(path: Path, rows: list) -> None:
    content = json.loads(Path(path).read_text())
    students = {r["student"] for r in rows}
    speed = [r for r in content.get("speed", []) if r["student"] not in students] + rows
    write_json_atomic(path, {**content, "speed": sorted(speed, key=lambda r: (r["student"], r["batch_size"]))})


def recipe_targets() -> list:
    """(student label, target) for every target of the recipes in recipes/ (variants are never judged)."""
    from .recipes import load_recipe

    recipes = [load_recipe(str(path)) for path in sorted(RECIPES.glob("*.json"))]
    return [(r["student_label"], t) for r in recipes if "variant" not in r for t in r.get("targets", [])]


def targets(rows: list, recipe_targets_: list | None = None) -> list:
    """The recipes' targets, each as (what, value, goal, met), from whichever rows exist. A target is
    {"method": M, "at_least": G, "margin": X, "what": label}: the average of the student's method-M row must
    reach G plus X, where G is a number, another method of the same student ("mse") or another student's row
    ("teacher init"). Targets with a label of their own come first. Judged on the recipes' own rows: a
    variant's row is shown beside them, never counted for them."""
    avg = {(r["student"], r["method"]): r["scores"]["avg"] for r in rows if "variant" not in r and not r.get("seed")}
    found = recipe_targets() if recipe_targets_ is None else recipe_targets_
    checks = []
    for student, target in sorted(found, key=lambda pair: "what" not in pair[1]):
        key, base, margin = (student, target["method"]), target["at_least"], target.get("margin", 0.0)
        if isinstance(base, str):
            other, _, method = base.rpartition(" ")
            goal = avg.get((other or student, method))
            what = target.get("what", f"{student} {METHOD_NAMES[target['method']]} ≥ {METHOD_NAMES[method]}")
        else:
            goal = base
            what = target.get("what", f"{student} {METHOD_NAMES[target['method']]} ≥ {base}")
        if key in avg and goal is not None:
            text = f"≥ {goal:.2f}" + (f" {'+' if margin > 0 else '−'} {abs(margin):.1f}" if margin else "")
            checks.append((what, avg[key], text, avg[key] >= round(goal + margin, 2)))
    return checks


def _minutes(seconds) -> str:
    return "" if seconds is None else f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def results_markdown(content: dict) -> str:
    """docs/results.json as the tables of docs/results.md: scores with each run's steps, wall time and final
    logit scale; the targets met or missed; encoding speed relative to the teacher."""
    rows = content["rows"]
    init_avg = {r["student"]: r["scores"]["avg"] for r in rows if r["method"] == "init" and "variant" not in r}
    lines = [
        "| student | method | " + " | ".join(TASKS) + " | avg | Δ init | stage-1 steps, time, final scale "
        "| FT steps, time | row wall time | command |",
        "|" + "---|" * (len(TASKS) + 8),
    ]
    for r in rows:
        if r.get("seed"):
            continue  # in the seeds table below
        delta = r["scores"]["avg"] - init_avg[r["student"]] if r["student"] in init_avg else None
        distill, finetune = r.get("distill"), r.get("finetune")
        stage1 = f"{distill['steps']}, {_minutes(distill['seconds'])}" if distill else ""
        if distill and distill.get("final_logit_scale") is not None:
            stage1 += f", {distill['final_logit_scale']:.2f}"
        ft = f"{finetune['steps']}, {_minutes(finetune['seconds'])}" if finetune else ""
        name = "teacher" if r["student"] == "teacher" else f"{r['student']}: {r['model']}"
        method = METHOD_NAMES.get(r["method"], r["method"]) + (f" (variant {r['variant']})" if "variant" in r else "")
        lines.append(
            f"| {name} | {method} | "
            + " | ".join(f"{r['scores'][t]:.2f}" for t in TASKS)
            + f" | **{r['scores']['avg']:.2f}** | {'' if delta is None else f'{delta:+.2f}'} | {stage1} "
            f"| {ft} | {_minutes(r.get('wall_seconds', r.get('seconds')))} | `{r['command']}` |"
        )
    lines += [
        "",
        "| run folder | stage | loss | lr | global batch | steps | data | best STS-B dev | final scale "
        "or temperature | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = {run["run_dir"]: (stage, run) for r in rows for stage in ("distill", "finetune") if (run := r.get(stage))}
    for run_dir, (stage, run) in runs.items():
        distill = stage == "distill"
        data = (
            f"{run['sentences']:,} sentences"
            if distill
            else "all NLI triplets"
            if not run["triplets_max"]
            else f"{run['triplets_max']:,} triplets"
        )
        final = run["final_logit_scale"] if distill else run["final_temperature"]
        final = "–" if final is None else final  # MSE-KD has no scale
        lines.append(
            f"| `{run_dir}` | {stage} | {run['loss'] if distill else 'sup_contrastive'} | {run['lr']} | "
            f"{run['batch_size_per_rank'] * run['world_size']} | {run['steps']} | {data} | "
            f"{run['best_stsb_dev']} | {final} | {_minutes(run['seconds'])} |"
        )
    lines += head_table(rows) + matryoshka_table(rows) + seeds_table(rows)
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [
        f"| {what} | {value:.2f} | {goal} | {'yes' if met else '**no**'} |" for what, value, goal, met in targets(rows)
    ]
    if content.get("speed"):
        lines += [
            "",
            "| student | batch | max length | student sent/s | teacher sent/s | speed-up | command |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {s['student']} | {s['batch_size']} | {s['max_length']} | {s['student_sentences_per_s']} | "
            f"{s['teacher_sentences_per_s']} | {s['speedup']}x | `{s['command']}` |"
            for s in content["speed"]
        ]
    return "\n".join(lines) + "\n"


def _row_name(r: dict) -> str:
    return f"{r['student']} {METHOD_NAMES.get(r['method'], r['method'])}" + (
        f" ({r['variant']})" if "variant" in r else ""
    )


def head_table(rows: list) -> list:
    """Students saved with their head: the encoder's own output, through the head, and against the teacher."""
    found = [r for r in rows if "with_head" in r and not r.get("seed")]
    if not found:
        return []
    lines = [
        "",
        "| row | own output (symmetric) | through the head (symmetric) | against the teacher (asymmetric) "
        "| asymmetric − symmetric | teacher | student / teacher sent/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in found:
        head = r["with_head"]
        asym = head.get("asymmetric", {}).get("avg")
        teacher = head.get("teacher_scores", {}).get("avg")
        speed = head.get("speed", {})
        rate = (
            f"{speed['sentences_per_s']} / {speed['teacher_sentences_per_s']}"
            if "teacher_sentences_per_s" in speed
            else ""
        )
        symmetric = head["head_scores"]["avg"]
        lines.append(
            f"| {_row_name(r)} | {r['scores']['avg']:.2f} | {symmetric:.2f} | "
            f"{'' if asym is None else f'**{asym:.2f}**'} | {'' if asym is None else f'{asym - symmetric:+.2f}'} | "
            f"{'' if teacher is None else f'{teacher:.2f}'} | {rate} |"
        )
    return lines


def matryoshka_table(rows: list) -> list:
    """7-task averages at each scored width (the first N dimensions, re-normalised)."""
    found = [r for r in rows if r.get("scores_by_dim") and not r.get("seed")]
    if not found:
        return []
    widths = sorted({int(d) for r in found for d in r["scores_by_dim"]}, reverse=True)
    lines = ["", "| row | " + " | ".join(f"avg @{d}" for d in widths) + " |", "|---" * (len(widths) + 1) + "|"]
    for r in found:
        by_dim = {int(d): v["avg"] for d, v in r["scores_by_dim"].items()}
        lines.append(
            f"| {_row_name(r)} | " + " | ".join(f"{by_dim[d]:.2f}" if d in by_dim else "" for d in widths) + " |"
        )
    return lines


def seeds_table(rows: list) -> list:
    """Rows run with several seeds: mean ± sd of the 7-task average (and of the asymmetric one), and the paired
    difference of CKD and MSE-KD (stage 1, and after fine-tuning) seed by seed."""
    import statistics

    groups = {}
    for r in rows:
        groups.setdefault((r["student"], r["method"], r.get("variant", "")), {})[r.get("seed", 0)] = r
    seeded = {key: by_seed for key, by_seed in groups.items() if len(by_seed) > 1}
    if not seeded:
        return []

    def spread(values):
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""

    lines = ["", "| row | seeds | avg per seed | mean ± sd | asymmetric mean ± sd |", "|---|---|---|---|---|"]
    for by_seed in seeded.values():
        seeds = sorted(by_seed)
        avgs = [by_seed[s]["scores"]["avg"] for s in seeds]
        asym = [
            by_seed[s]["with_head"]["asymmetric"]["avg"]
            for s in seeds
            if "asymmetric" in by_seed[s].get("with_head", {})
        ]
        lines.append(
            f"| {_row_name(by_seed[seeds[0]])} | {', '.join(map(str, seeds))} | {', '.join(f'{a:.2f}' for a in avgs)} "
            f"| **{spread(avgs)}** | {spread(asym)} |"
        )
    lines += ["", "| paired difference (same seed) | seeds | per seed | mean ± sd |", "|---|---|---|---|"]
    for student, variant in sorted({(k[0], k[2]) for k in seeded}):
        for ckd, mse in (("ckd", "mse"), ("disco", "mse+ft")):
            a, b = groups.get((student, ckd, variant), {}), groups.get((student, mse, variant), {})
            seeds = sorted(set(a) & set(b))
            if len(seeds) < 2:
                continue
            diffs = [a[s]["scores"]["avg"] - b[s]["scores"]["avg"] for s in seeds]
            name = f"{student}{f' ({variant})' if variant else ''} {METHOD_NAMES[ckd]} − {METHOD_NAMES[mse]}"
            per_seed = ", ".join(f"{d:+.2f}" for d in diffs)
            lines.append(f"| {name} | {', '.join(map(str, seeds))} | {per_seed} | **{spread(diffs)}** |")
    return lines
