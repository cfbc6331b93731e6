"""Recipes and the results table of the reproduction: every recipe parses as the launchers' flags, rows are
replaced rather than duplicated, and the targets are judged from the rows, missed ones marked."""

import json

import pytest

from disco_dist.cli.config import distill_parser, finetune_parser
from disco_dist.core.errors import UserError
from disco_dist.core.files import RECIPES
from disco_dist.report.recipes import flags, load_recipe
from disco_dist.report.results import merge_result_row, results_markdown, targets

TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STS-B", "SICK-R")


def row(student, method, avg, **extra):
    return {
        "model": f"model {student}",
        "student": student,
        "method": method,
        "scores": {**{t: avg for t in TASKS}, "avg": avg},
        "command": f"cmd {student} {method}",
        **extra,
    }


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.json")))
def test_every_recipe_is_valid_launcher_flags(name):
    recipe = load_recipe(name)
    keep = ["--keep-layers", *map(str, recipe["keep_layers"])] if recipe.get("keep_layers") else []
    distill = distill_parser().parse_args(["--student", recipe["student"], *keep, *map(str, flags(recipe["distill"]))])
    assert {k: getattr(distill, k) for k in recipe["distill"]} == recipe["distill"]
    finetune = finetune_parser().parse_args(["--student", "x", *map(str, flags(recipe["finetune"]))])
    assert {k: getattr(finetune, k) for k in recipe["finetune"]} == recipe["finetune"]


def test_targets_come_from_the_recipe_files_in_their_order():
    """A recipe's targets (recipes/*.json) are what is judged; labelled targets first, then each student's."""
    rows = [
        row("teacher", "init", 80.53),
        row("S1", "init", 78.87),
        row("S1", "mse", 79.0),
        row("S1", "ckd", 79.5),
        row("S1", "disco", 80.2),
        row("S2", "init", 73.9),
        row("S2", "disco", 76.2),
    ]
    assert [what for what, *_ in targets(rows)] == [
        "S1 DisCo ≥ teacher avg − 0.5",
        "S2 DisCo ≥ its init + 2.0",
        "S1 CKD ≥ MSE-KD",
        "S1 CKD + FT (DisCo) ≥ CKD",
    ]
    mine = [
        ("S9", {"method": "ckd", "at_least": "teacher init", "margin": -1.0}),
        ("S9", {"method": "ckd", "at_least": 70}),
    ]
    assert targets([row("teacher", "init", 80.0), row("S9", "ckd", 79.5)], mine) == [
        ("S9 CKD ≥ initialisation", 79.5, "≥ 80.00 − 1.0", True),
        ("S9 CKD ≥ 70", 79.5, "≥ 70.00", True),
    ]


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(UserError, match="known recipes: S1, S1-40k, .*S2, .*S3, S3-scale10, demo"):
        load_recipe("S9")


def test_a_variant_recipe_changes_only_the_flags_it_names():
    base, variant = load_recipe("S3"), load_recipe("S3-scale10")
    assert (variant["label"], variant["student_label"], variant["variant"]) == ("S3-scale10", "S3", "S3-scale10")
    changed = {
        k
        for k in base["distill"].keys() | variant["distill"].keys()
        if base["distill"].get(k) != variant["distill"].get(k)
    }
    assert changed == {"logit_scale", "fixed_logit_scale"} and variant["finetune"] == base["finetune"]
    assert variant["keep_layers"] == base["keep_layers"] and variant["student"] == base["student"]
    args = distill_parser().parse_args(["--student", "x", *map(str, flags(variant["distill"]))])
    assert args.logit_scale == 10 and args.fixed_logit_scale and args.lr == base["distill"]["lr"]


def test_a_recipe_whose_bases_loop_is_one_clear_error(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"base": str(tmp_path / "b.json")}))
    (tmp_path / "b.json").write_text(json.dumps({"base": str(tmp_path / "a.json")}))
    with pytest.raises(UserError, match="chain of bases comes back"):
        load_recipe(str(tmp_path / "a.json"))


def test_a_variant_row_sits_beside_the_recipe_row_and_is_not_judged(tmp_path):
    path = tmp_path / "results.json"
    for r in (
        row("S3", "init", 51.5),
        row("S3", "mse", 78.86),
        row("S3", "ckd", 79.1, variant="S3-scale10"),
        row("S3", "ckd", 78.78),
        row("S3", "disco", 80.47),
    ):
        merge_result_row(path, r)
    rows = json.loads(path.read_text())["rows"]
    assert [(r["method"], r.get("variant")) for r in rows] == [
        ("init", None),
        ("mse", None),
        ("ckd", None),
        ("ckd", "S3-scale10"),
        ("disco", None),
    ]
    checks = {what: (value, met) for what, value, _, met in targets(rows)}
    assert checks["S3 CKD ≥ MSE-KD"] == (78.78, False)  # the recipe's own row, not the variant's 79.1
    table = results_markdown({"rows": rows})
    assert "| S3: model S3 | CKD (variant S3-scale10) | 79.10" in table and "| **79.10** | +27.60 |" in table


def test_a_rerun_row_replaces_the_old_one_in_table_order(tmp_path):
    path = tmp_path / "results.json"
    for r in (row("S2", "ckd", 75.0), row("teacher", "init", 80.0), row("S2", "init", 73.9), row("S2", "ckd", 76.0)):
        merge_result_row(path, r)
    rows = json.loads(path.read_text())["rows"]
    assert [(r["student"], r["method"], r["scores"]["avg"]) for r in rows] == [
        ("teacher", "init", 80.0),
        ("S2", "init", 73.9),
        ("S2", "ckd", 76.0),
    ]


def test_targets_are_judged_from_the_rows_and_misses_marked():
    rows = [
        row("teacher", "init", 80.53),
        row("S1", "init", 78.87),
        row("S1", "disco", 80.0),
        row("S2", "init", 73.9),
        row("S2", "mse", 76.0),
        row("S2", "ckd", 75.5),
        row("S2", "disco", 76.2),
        row("S3", "disco", 77.9),
    ]
    checks = {what: (value, met) for what, value, _, met in targets(rows)}
    assert checks["S1 DisCo ≥ teacher avg − 0.5"] == (80.0, False)  # 80.03 needed
    assert checks["S2 DisCo ≥ its init + 2.0"] == (76.2, True)
    assert checks["S3 DisCo ≥ 78.0"] == (77.9, False)
    assert checks["S2 CKD ≥ MSE-KD"] == (75.5, False)
    assert checks["S2 CKD + FT (DisCo) ≥ CKD"] == (76.2, True)
    assert "S1 CKD ≥ MSE-KD" not in checks  # no rows, no verdict
    table = results_markdown({"rows": rows})
    assert "| S2 CKD ≥ MSE-KD | 75.50 | ≥ 76.00 | **no** |" in table
    assert "| S2: model S2 | MSE-KD | 76.00" in table and "+2.10" in table


def test_a_run_shared_by_two_rows_is_listed_once_with_its_record():
    distill = {
        "run_dir": "runs/S2/distill-ckd",
        "steps": 781,
        "seconds": 1708.3,
        "world_size": 2,
        "best_stsb_dev": 84.34,
        "lr": 2e-4,
        "batch_size_per_rank": 64,
        "epochs": 1.0,
        "sentences": 100000,
        "loss": "ckd",
        "queue_size": 65536,
        "final_logit_scale": 21.71,
    }
    finetune = {
        "run_dir": "runs/S2/ft-after-ckd",
        "steps": 99,
        "seconds": 300.0,
        "world_size": 2,
        "best_stsb_dev": 86.0,
        "lr": 5e-5,
        "batch_size_per_rank": 32,
        "epochs": 1.0,
        "final_temperature": 0.05,
        "triplets_max": 0,
    }
    table = results_markdown(
        {
            "rows": [
                row("S2", "init", 73.9),
                row("S2", "ckd", 77.36, distill=distill),
                row("S2", "disco", 78.0, distill=distill, finetune=finetune),
            ]
        }
    )
    assert (
        table.count(
            "| `runs/S2/distill-ckd` | distill | ckd | 0.0002 | 128 | 781 | 100,000 sentences | 84.34 | "
            "21.71 | 28 min |"
        )
        == 1
    )
    assert "| `runs/S2/ft-after-ckd` | finetune | sup_contrastive | 5e-05 | 64 | 99 | all NLI triplets |" in table
    assert "| 781, 28 min, 21.71 | 99, 5 min |" in table  # the DisCo row: both of its stages


def test_a_zero_in_a_recipe_is_passed_as_a_flag_value():
    """0 == False in Python: `"checkpoint_every": 0` (the demo recipe's) must become `--checkpoint-every 0`,
    not be dropped like a false switch."""
    assert flags({"checkpoint_every": 0, "mse_weight": 0.0, "fixed_logit_scale": False, "head": None}) == [
        "--checkpoint-every",
        0,
        "--mse-weight",
        0.0,
    ]
    assert flags({"fixed_logit_scale": True, "keep_layers": [0, 2]}) == ["--fixed-logit-scale", "--keep-layers", 0, 2]


def test_a_variant_that_changes_only_fine_tuning_reuses_its_bases_stage_one_and_seeds_have_their_own_folders(tmp_path):
    from disco_dist.report.recipes import Reproduction

    through = Reproduction(load_recipe("S2-40k-through"), tmp_path, tmp_path / "shards", 2)
    assert through.stage1_root == tmp_path / "S2-40k" and through.root == tmp_path / "S2-40k-through"
    seeded = Reproduction(load_recipe("S2-40k"), tmp_path, tmp_path / "shards", 2, seed=2)
    assert seeded.root == seeded.stage1_root == tmp_path / "S2-40k" / "seed-2"
    assert seeded.seeded == ["--seed", 2]
    # a variant with flags of its own for stage 1 runs it itself
    assert Reproduction(load_recipe("S2-40k-scale10"), tmp_path, tmp_path, 2).stage1_root == tmp_path / "S2-40k-scale10"


def test_seeded_rows_are_kept_apart_and_tabled_as_mean_sd_with_paired_differences(tmp_path):
    results = tmp_path / "results.json"
    averages = {"ckd": (77.0, 77.6, 76.9), "mse": (76.5, 76.4, 76.8)}
    for method, values in averages.items():
        for seed, avg in enumerate(values):
            merge_result_row(results, row("S2", method, avg, variant="S2-40k", **({"seed": seed} if seed else {})))
    content = json.loads(results.read_text())
    assert len(content["rows"]) == 6
    table = results_markdown(content)
    main = table.split("\n\n")[0]
    assert main.count("variant S2-40k") == 2  # seed 0 only in the main table
    ckd_line = next(line for line in table.splitlines() if line.startswith("| S2 CKD (S2-40k) | 0, 1, 2 |"))
    assert "77.00, 77.60, 76.90" in ckd_line and "**77.17 ± 0.38**" in ckd_line
    diff = next(line for line in table.splitlines() if line.startswith("| S2 (S2-40k) CKD − MSE-KD |"))
    # +0.50, +1.20, +0.10: mean 0.60, sd 0.56
    assert "+0.50, +1.20, +0.10" in diff and "**0.60 ± 0.56**" in diff


def test_head_and_width_tables_show_what_a_row_recorded(tmp_path):
    results = tmp_path / "results.json"
    with_head = {"head_scores": {"avg": 78.0}, "asymmetric": {"avg": 77.7}, "teacher_scores": {"avg": 80.53},
                 "speed": {"sentences_per_s": 900.0, "teacher_sentences_per_s": 60.0}}  # fmt: skip
    by_dim = {"384": {"avg": 80.0}, "128": {"avg": 79.1}}
    merge_result_row(results, row("S1", "disco", 80.0, variant="S1-40k", with_head=with_head, scores_by_dim=by_dim))
    table = results_markdown(json.loads(results.read_text()))
    assert "| S1 CKD + FT (DisCo) (S1-40k) | 80.00 | 78.00 | **77.70** | -0.30 | 80.53 | 900.0 / 60.0 |" in table
    assert "| row | avg @384 | avg @128 |" in table
    assert "| S1 CKD + FT (DisCo) (S1-40k) | 80.00 | 79.10 |" in table
