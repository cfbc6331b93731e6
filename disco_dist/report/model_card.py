"""The model card every saved student carries: `final/README.md` in the hub's format (YAML metadata, then
what the model is, how it was made, how to use it, its scores), as sentence-transformers writes one.

The facts live beside it in `final/training.json`: one record per training stage (a fine-tuned student's
starts with its stage-1 model's), and, once `evaluate.py` has scored the folder as saved, the seven-task
scores, the asymmetric ones and the speed against the teacher. The card is re-rendered from that file.
"""

import json
import time
from pathlib import Path

from ..core.files import write_json_atomic

FACTS = "training.json"
CITATION = """```bibtex
@article{gao2021distilcse,
  title   = {DistilCSE: Effective Knowledge Distillation For Contrastive Sentence Embeddings},
  author  = {Gao, Chaochen and Wu, Xing and Wang, Peng and Wang, Jue and Zang, Liangjun and Wang, Zhongyuan
             and Hu, Songlin},
  journal = {arXiv preprint arXiv:2112.05638},
  year    = {2021},
  note    = {later versions: DisCo: Effective Knowledge Distillation For Contrastive Learning of Sentence Embeddings}
}
```"""
TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STS-B", "SICK-R", "avg")


def hub_id(name_or_path) -> str:
    """The hub id of a pretrained model this project fetches (sentence-transformers/<name>), else the name."""
    from ..models.fetch import MODELS

    name = Path(str(name_or_path)).name
    return f"sentence-transformers/{name}" if name in MODELS else str(name_or_path)


def _used_from_shards(run: dict) -> dict:
    """The teacher and data of a stage-1 run that did not say (`python -m disco_dist.report.model_card` on an older
    run), read from its shards' index.json where that is still on disk."""
    index_file = Path(str(run["shards"])) / "index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    return {
        "teacher": (index.get("teacher") or {}).get("model", run.get("teacher")),
        "data": f"{index['total']:,} sentences of {Path(index['source']).name}" if index else str(run["shards"]),
    }


def stage_record(stage: str, run: dict, summary: dict, used: dict | None = None) -> dict:
    """What one finished training stage did, for the card: from the run's record (its config.json: the flags as
    given and the precision decided), its train_summary and what the stage says it used (`used`: the teacher it
    learned from and the data it read, e.g. remote shards)."""
    from ..core.hardware import hardware

    record = {
        "stage": stage,
        "started_from": hub_id(run["student"]),
        "keep_layers": run["keep_layers"],
        "lr": run["lr"],
        "batch_size": run["batch_size"] * summary["world_size"],
        "ranks": summary["world_size"],
        "epochs": run["epochs"],
        "steps": summary["steps"],
        "precision": run["precision"],
        "seed": run["seed"],
        "matryoshka_dims": run["matryoshka_dims"],
        "best_stsb_dev": None if summary.get("best_dev") is None else round(summary["best_dev"], 2),
        "seconds": summary["seconds"],
        "hardware": hardware(),
        "finished": time.strftime("%Y-%m-%d"),
    }
    if stage == "distill":
        used = used or _used_from_shards(run)
        record.update(
            teacher=hub_id(used["teacher"]),
            data=used["data"],
            loss=run["loss"],
            logit_scale=None if run["loss"] != "ckd" else round(summary.get("logit_scale", run["logit_scale"]), 2),
            queue_size=run["queue_size"] if run["loss"] == "ckd" else None,
            head_kept=run["keep_head"],
        )
    else:
        nli = run.get("nli") or ["shared SNLI"]
        record.update(
            data=f"NLI triplets ({run['max_triplets'] or 'all'}; {', '.join(map(str, nli))})",
            loss="supervised contrastive (SimCSE)",
            temperature=run["temperature"],
            student_head=run["student_head"],
        )
    return record


def write_model_card(folder: Path, stage: str, run: dict, summary: dict, used: dict | None = None) -> None:
    """Record this stage (after the start model's stages, if it has a card) and render the card."""
    folder = Path(folder)
    start = Path(str(run["student"])) / FACTS
    stages = json.loads(start.read_text())["stages"] if start.is_file() else []
    facts = {"stages": [*stages, stage_record(stage, run, summary, used)]}
    write_json_atomic(folder / FACTS, facts)
    render(folder)


def update_model_card(folder, record: dict) -> bool:
    """Add an evaluation of the folder as saved to its card; False (nothing written) for a folder without one,
    or for a subset of the tasks. The caller passes only scores of the folder as saved (no other layers,
    pooling, truncation, or head left out)."""
    facts_file = Path(folder) / FACTS
    if not facts_file.is_file() or not set(TASKS) <= set(record["scores"]):
        return False
    facts = json.loads(facts_file.read_text())
    facts["evaluation"] = {
        key: record[key]
        for key in ("scores", "asymmetric", "teacher_scores", "scores_by_dim", "speed")
        if key in record
    }
    facts["evaluation"]["hardware"] = record.get("hardware")
    write_json_atomic(facts_file, facts)
    render(folder)
    return True


def _metadata(folder: Path, facts: dict):
    from huggingface_hub import ModelCardData

    first = facts["stages"][0]
    snli = any(s["stage"] == "finetune" and "shared SNLI" in s["data"] for s in facts["stages"])
    return ModelCardData(
        base_model=first["started_from"],
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        license="apache-2.0",
        language="en",
        datasets=["stanfordnlp/snli"] if snli else None,
        tags=["sentence-transformers", "sentence-similarity", "feature-extraction", "knowledge-distillation", "disco"],
    )


def _table(rows: dict) -> str:
    lines = ["| | " + " | ".join(TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
    for label, scores in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{scores[t]:.2f}" if t in scores else "–" for t in TASKS) + " |")
    return "\n".join(lines)


def render(folder) -> Path:
    from huggingface_hub import ModelCard

    folder = Path(folder)
    facts = json.loads((folder / FACTS).read_text())
    config = json.loads((folder / "config.json").read_text())
    modules = json.loads((folder / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    dense = next((m["path"] for m in modules if m["type"].endswith("Dense")), None)
    width = json.loads((folder / dense / "config.json").read_text())["out_features"] if dense else config["hidden_size"]
    first = facts["stages"][0]
    finetuned = any(s["stage"] == "finetune" for s in facts["stages"])
    losses = {s.get("loss") for s in facts["stages"] if s["stage"] == "distill"}
    method = (
        ("A DisCo", "the DisCo method: contrastive knowledge distillation, then contrastive fine-tuning")
        if "ckd" in losses and finetuned
        else ("A CKD", "contrastive knowledge distillation")
        if "ckd" in losses
        else (
            "An MSE-KD",
            "knowledge distillation by mean squared error" + (", then contrastive fine-tuning" if finetuned else ""),
        )
        if losses
        else ("A fine-tuned", "contrastive fine-tuning")
    )
    teacher = next((s["teacher"] for s in facts["stages"] if s.get("teacher")), None)
    layers = f"layers {', '.join(map(str, first['keep_layers']))} of " if first.get("keep_layers") else ""
    parts = [
        f"# {method[0]} student{' of ' + teacher if teacher else ''}: {layers}{first['started_from']}",
        f"A sentence-embedding model made by disco-dist ({method[1]}): "
        f"{config['num_hidden_layers']} transformer layers ({layers}{first['started_from']}), "
        f"{'distilled from ' + teacher + ' on unlabelled sentences' if teacher else 'trained'}"
        f"{', then fine-tuned contrastively on NLI triplets' if finetuned else ''}. "
        f"It maps sentences to {width}-dimensional vectors ({' -> '.join(kinds)})"
        + (
            f"; its projection head is kept, so its vectors live in the teacher's space: query an index built "
            f"with {teacher} using this model."
            if dense
            else "."
        ),
        "## Usage (sentence-transformers)",
        "```python\nfrom sentence_transformers import SentenceTransformer\n\n"
        f'model = SentenceTransformer("{folder}")\n'
        'embeddings = model.encode(["A man is playing a guitar.", "Someone plays music."])\n'
        "print(model.similarity(embeddings, embeddings))\n```",
        "## Usage (transformers)",
        _transformers_usage(folder, dense, "Normalize" in kinds, json.loads((folder / "disco_dist.json").read_text())),
        "## How it was made",
        _stages_table(facts["stages"]),
    ]
    evaluation = facts.get("evaluation")
    if evaluation:
        teacher = evaluation.get("speed", {}).get("teacher") or teacher
        rows = {"this model": evaluation["scores"]}
        if "asymmetric" in evaluation:
            rows["this model against the teacher (one side each)"] = evaluation["asymmetric"]
            rows[f"teacher {teacher}"] = evaluation["teacher_scores"]
        for width_, scores in (evaluation.get("scores_by_dim") or {}).items():
            rows[f"first {width_} dimensions"] = scores
        parts += [
            "## Evaluation",
            "Seven STS tasks, Spearman x 100 of the cosine similarity (STS12-16 all pairs pooled per year; STS-B and "
            "SICK-R test sets), scored by `python launchers/evaluate.py`"
            + (
                " with `--against-teacher`: one sentence of each pair embedded by this model, the other by the "
                "teacher, both ways round, averaged"
                if "asymmetric" in evaluation
                else ""
            )
            + f" on {evaluation.get('hardware')}.",
            _table(rows),
        ]
        speed = evaluation.get("speed", {})
        if "teacher_sentences_per_s" in speed:
            same = speed.get("teacher_hardware") == [evaluation.get("hardware")]
            parts.append(
                "Speed on the STS sentences, as `evaluate.py` timed it (the teacher when its embeddings were cached; "
                f"a busy machine slows either): {speed['sentences_per_s']} sentences/s against the "
                f"teacher's {speed['teacher_sentences_per_s']} "
                + (
                    f"({speed['sentences_per_s'] / speed['teacher_sentences_per_s']:.1f}x)."
                    if same
                    else f"(timed on {', '.join(speed.get('teacher_hardware') or ['an unrecorded machine'])}: "
                    "not a ratio on one machine)."
                )
            )
    parts += ["## Citation", CITATION]
    card = ModelCard(f"---\n{_metadata(folder, facts).to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n")
    card.save(folder / "README.md")
    return folder / "README.md"


def _stages_table(stages: list) -> str:
    keys = {
        "stage": "stage",
        "started_from": "started from",
        "teacher": "teacher",
        "data": "data",
        "loss": "loss",
        "logit_scale": "final logit scale",
        "queue_size": "queue of teacher embeddings",
        "temperature": "temperature",
        "head_kept": "projection head kept",
        "student_head": "head in fine-tuning",
        "lr": "learning rate",
        "batch_size": "global batch",
        "ranks": "ranks",
        "epochs": "epochs",
        "steps": "steps",
        "precision": "precision",
        "matryoshka_dims": "Matryoshka widths",
        "seed": "seed",
        "best_stsb_dev": "best STS-B dev (selects the model)",
        "seconds": "wall time (s)",
        "hardware": "hardware",
        "finished": "finished",
    }
    lines = ["| | " + " | ".join(f"stage {i + 1}" for i in range(len(stages))) + " |"]
    lines.append("|---" * (len(stages) + 1) + "|")
    for key, name in keys.items():
        values = [s.get(key) for s in stages]
        if any(v not in (None, False, []) for v in values):
            lines.append(f"| {name} | " + " | ".join("–" if v is None else str(v) for v in values) + " |")
    return "\n".join(lines)


def _transformers_usage(folder: Path, dense: str | None, normalize: bool, settings: dict) -> str:
    pooling = {
        "mean": 'mask = batch["attention_mask"].unsqueeze(-1).float()\n'
        "embeddings = (tokens * mask).sum(1) / mask.sum(1)  # mean pooling\n",
        "cls": "embeddings = tokens[:, 0]  # [CLS] pooling\n",
    }.get(
        settings.get("pooling"), f"embeddings = ...  # {settings.get('pooling')} pooling, see 1_Pooling/config.json\n"
    )
    head = (
        f'head = load_file("{folder}/{dense}/model.safetensors")\n'
        'embeddings = embeddings @ head["linear.weight"].T + head["linear.bias"]\n'
        if dense
        else ""
    )
    return (
        "```python\nimport torch\n"
        + ("from safetensors.torch import load_file\n" if dense else "")
        + "from transformers import AutoModel, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{folder}")\nmodel = AutoModel.from_pretrained("{folder}")\n'
        'batch = tokenizer(["A man is playing a guitar."], padding=True, truncation=True, return_tensors="pt")\n'
        "with torch.no_grad():\n    tokens = model(**batch).last_hidden_state\n"
        + pooling
        + head
        + ("embeddings = torch.nn.functional.normalize(embeddings, dim=-1)\n" if normalize else "")
        + "```"
    )


def card_for_run(run_dir) -> Path:
    """Write the card of a finished run's final model from the run's config.json and train_summary.json (for
    runs made before cards were written): `python -m disco_dist.report.model_card RUN_DIR`."""
    from ..core.errors import UserError

    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
        summary = json.loads((run_dir / "train_summary.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{run_dir}: not a finished run folder ({err})") from None
    defaults = {"keep_head": False, "student_head": "frozen", "matryoshka_dims": None}
    write_model_card(run_dir / "final", config["stage"], {**defaults, **config}, summary)
    return run_dir / "final" / "README.md"


if __name__ == "__main__":
    import sys

    from ..core.errors import exit_on_user_error

    print(*(exit_on_user_error(card_for_run)(path) for path in sys.argv[1:]), sep="\n")
