"""The pictures of docs/results.md, drawn from docs/results.json and the runs' TensorBoard files:
    dev_curves.png      STS-B dev Spearman against the step, per method, for each student whose runs are here
    sts_tasks.png       the seven-task table as grouped bars (the recipes' own rows, one seed)
    quality_speed.png   7-task average against the encoding speed-up over the teacher
    matryoshka.png      7-task average against the embedding width, plain students truncated vs Matryoshka ones
A figure whose inputs are missing (e.g. run folders of another machine) is skipped with a line saying so.
"""

from pathlib import Path

from .recipes import METHOD_NAMES
from .results import TASKS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dev_curves(run_dir) -> dict:
    """{step: STS-B dev Spearman} of a run, from its TensorBoard events ({} if it has none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(run_dir) / "tensorboard"
    if not folder.is_dir():
        return {}
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    if "eval/stsb_dev_spearman" not in events.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in events.Scalars("eval/stsb_dev_spearman")}


def _label(row: dict) -> str:
    return METHOD_NAMES.get(row["method"], row["method"]) + (f" ({row['variant']})" if "variant" in row else "")


def draw_dev_curves(rows: list, out: Path, log=print) -> Path | None:
    curves = {}  # student -> {label: {step: score}}, stage 1 then fine-tuning (its steps offset by stage 1's)
    continued = {r["distill"]["run_dir"] for r in rows if "distill" in r and "finetune" in r}
    for r in rows:
        if r.get("seed") or "distill" not in r and "finetune" not in r:
            continue
        if "finetune" not in r and r["distill"]["run_dir"] in continued:
            continue  # its curve is the first part of the fine-tuned row's
        stage1 = dev_curves(r["distill"]["run_dir"]) if "distill" in r else {}
        stage2 = dev_curves(r["finetune"]["run_dir"]) if "finetune" in r else {}
        if (r.get("distill") and not stage1) or (r.get("finetune") and not stage2):
            continue
        offset = r["distill"]["steps"] if "distill" in r else 0
        curves.setdefault(r["student"], {})[_label(r)] = {**stage1, **{offset + s: v for s, v in stage2.items()}}
    if not curves:
        log(f"skipped {out.name}: none of the rows' run folders (with TensorBoard files) are on this machine")
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), squeeze=False)
    for ax, (student, by_label) in zip(axes[0], sorted(curves.items())):
        for label, points in sorted(by_label.items()):
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], marker="o", markersize=3, label=label)
        ax.set(
            title=f"{student}: STS-B dev during training", xlabel="step (stage 1, then fine-tuning's steps after it)"
        )
        ax.set_ylabel("STS-B dev Spearman x 100")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out)


def draw_sts_tasks(rows: list, out: Path, log=print) -> Path | None:
    chosen = [
        r
        for r in rows
        if not r.get("seed")
        and "variant" not in r
        and (r["student"] == "teacher" or r["method"] in ("disco", "mse+ft"))
    ]
    if not chosen:
        log(f"skipped {out.name}: no rows")
        return None
    plt = _pyplot()
    columns = [*TASKS, "avg"]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(chosen)
    for i, r in enumerate(chosen):
        ax.bar([c + i * width for c in range(len(columns))], [r["scores"][t] for t in columns], width,
               label=f"{r['student']} {_label(r)}")  # fmt: skip
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(columns))], columns)
    low = min(r["scores"][t] for r in chosen for t in columns)
    ax.set(ylabel="Spearman x 100", title="Seven STS tasks (test sets): teacher, DisCo and MSE-KD + FT students")
    ax.set_ylim(5 * int(low // 5), 90)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def draw_quality_speed(content: dict, out: Path, log=print) -> Path | None:
    speed = {s["student"]: s["speedup"] for s in content.get("speed", []) if s["batch_size"] > 1}
    scored = {r["student"]: r["scores"]["avg"] for r in content["rows"] if r["method"] == "disco" and not r.get("seed")
              and "variant" not in r}  # fmt: skip
    teacher = next((r["scores"]["avg"] for r in content["rows"] if r["student"] == "teacher"), None)
    points = {s: (speed[s], scored[s]) for s in speed if s in scored}
    if not points or teacher is None:
        log(f"skipped {out.name}: no speed rows (reproduce.py S2 speed) or no DisCo rows")
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([1.0], [teacher], marker="*", s=150, color="black", label="teacher")
    for student, (x, y) in sorted(points.items()):
        ax.scatter([x], [y], s=60, label=f"{student} DisCo")
        ax.annotate(f"{student} {y:.2f}, {x:.1f}x", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.annotate(f"teacher {teacher:.2f}", (1.0, teacher), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set(xscale="log", xlabel="encoding speed-up over the teacher (batch 128, CPU)", ylabel="7-task avg")
    ax.set_title("Quality against speed")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out)


def draw_matryoshka(rows: list, out: Path, log=print) -> Path | None:
    found = [r for r in rows if r.get("scores_by_dim") and not r.get("seed")]
    if not found:
        log(f"skipped {out.name}: no rows scored per width (a recipe with evaluate.dims)")
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for r in found:
        by_width = {int(d): scores["avg"] for d, scores in r["scores_by_dim"].items()}
        widths = sorted(by_width)
        values = [by_width[d] for d in widths]
        ax.plot(widths, values, marker="o", label=f"{r['student']} {_label(r)}")
    ax.set(xscale="log", xlabel="embedding width (first N dimensions)", ylabel="7-task avg")
    ax.set_xticks(sorted({int(d) for r in found for d in r["scores_by_dim"]}))
    ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.get_xaxis().set_minor_locator(plt.matplotlib.ticker.NullLocator())
    ax.set_title("Matryoshka: quality at each width")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


def draw_all(content: dict, folder: Path, log=print) -> list:
    rows = content["rows"]
    drawn = [
        draw_dev_curves(rows, folder / "dev_curves.png", log),
        draw_sts_tasks(rows, folder / "sts_tasks.png", log),
        draw_quality_speed(content, folder / "quality_speed.png", log),
        draw_matryoshka(rows, folder / "matryoshka.png", log),
    ]
    return [path for path in drawn if path is not None]
