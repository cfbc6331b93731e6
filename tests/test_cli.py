"""Bad flags, paths and combinations: one clear line naming the thing, exit 2, no traceback."""

import json

import pytest
from conftest import REPO, assert_one_line, build_tiny_run_inputs, run

from disco_dist.report.recipes import flags


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root, student, teacher, _ = build_tiny_run_inputs(
        tmp_path_factory.mktemp("cli"), [f"sentence {i}" for i in range(100)], shard_size=50
    )
    return root, student, teacher


def distill(env=None, **options):
    """launchers/distill.py with `options` as flags (shards=... -> --shards ...)."""
    return run("distill.py", *flags(options), env=env)


def test_missing_shard_folder(tmp_path):
    assert_one_line(
        run("distill.py", "--shards", tmp_path / "nope", "--run-dir", tmp_path / "r"), "nope", "make_shards"
    )


@pytest.mark.parametrize("variant", [("--teacher-ds-config", "ds_configs/x.json"), ("--teacher-token-budget", "0")])
def test_a_benchmark_variant_without_its_own_out_file_is_refused(variant):
    """A variant (another ZeRO-3 config, another token budget) merged into docs/benchmarks.json would replace the
    default's row: it needs its own --out."""
    result = run("benchmark.py", "--parts", "zero3_vs_replicated", "teacher_encode", *variant)
    assert_one_line(result, variant[0], "--out")


def test_missing_student_folder(tiny, tmp_path):
    root, _, teacher = tiny
    result = distill(
        shards=root / "shards", student=tmp_path / "no" / "student", teacher=teacher, run_dir=tmp_path / "r"
    )
    assert_one_line(result, "does not exist")


def test_width_mismatch_without_projection(tiny, tmp_path):
    root, student, teacher = tiny
    result = distill(shards=root / "shards", student=student, teacher=teacher, head="none", run_dir=tmp_path / "r")
    assert_one_line(result, "--head none", "32", "48")


def test_cached_mode_without_embeddings(tiny, tmp_path):
    root, student, _ = tiny
    result = distill(shards=root / "shards", student=student, teacher_mode="cached", run_dir=tmp_path / "r")
    assert_one_line(result, "no teacher embeddings")


@pytest.mark.parametrize(
    "script, args, needle",
    [
        ("distill.py", ["--batch-size", 0], "--batch-size"),
        ("distill.py", ["--loss", "l1"], "--loss"),
        ("finetune.py", ["--select", "best", "--eval-every", 0], "--select best"),
        ("distill.py", ["--ds-config", "no-such-dir/x.json"], "x.json"),
        ("distill.py", ["--logit-scale-lr", 0], "--logit-scale-lr must be positive"),
        ("distill.py", ["--loss", "mse", "--logit-scale-lr", 0.01], "learns no logit scale"),
        ("finetune.py", ["--logit-scale-lr", 0.01], "--learnable-temperature"),
        ("evaluate.py", ["some-model", "--tasks", "STS99"], "--tasks"),
        ("make_shards.py", ["--limit", 5], "--out"),
    ],
    ids=lambda value: value if isinstance(value, str) and value.endswith(".py") else None,
)
def test_a_bad_flag_value_or_combination_is_one_line(script, args, needle):
    """The flag parsers and checks of every command answer in one line naming the flag (exit 2)."""
    assert_one_line(run(script, *args), needle)


def test_an_unknown_key_in_a_config_file_is_one_line(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"batch-size": 8, "no_such_flag": 1}))
    assert_one_line(run("distill.py", "--config", config), "no_such_flag")


def test_config_file_values_yield_to_the_command_line(tmp_path):
    from disco_dist.cli.config import distill_parser, parse

    config = tmp_path / "c.json"
    config.write_text(json.dumps({"batch_size": 8, "lr": 0.001, "shards": "somewhere"}))
    args = parse(distill_parser(), ["--config", str(config), "--lr", "0.002"])
    assert (args.batch_size, args.lr, str(args.shards)) == (8, 0.002, "somewhere")


def test_unwritable_run_folder(tiny, tmp_path):
    root, student, teacher = tiny
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = distill(shards=root / "shards", student=student, teacher=teacher, run_dir=blocker / "run")
    assert_one_line(result, "is not writable", "a-file")


def test_a_typo_in_the_student_deepspeed_config_is_refused(tiny, tmp_path):
    """DeepSpeed ignores unknown top-level keys: a typo would silently train without ZeRO. Refused in one line
    by both training stages, before any rank starts."""
    root, student, teacher = tiny
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    common = ["--shards", root / "shards", "--student", student, "--teacher", teacher, "--run-dir", tmp_path / "r"]
    assert_one_line(run("distill.py", *common, "--ds-config", typo), "typo.json", "unknown key(s) zero_optimisation")
    assert_one_line(run("finetune.py", "--student", student, "--ds-config", typo), "zero_optimisation")
    assert not (tmp_path / "r").exists()


def test_a_bad_zero_key_in_the_teacher_deepspeed_config_is_refused(tiny, tmp_path):
    """The teacher's config, in distillation and in the cache pass alike, before any rank starts."""
    root, student, teacher = tiny
    bad_zero = tmp_path / "bad-zero.json"
    bad_zero.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_com": True}}))
    common = ["--shards", root / "shards", "--student", student, "--teacher", teacher, "--run-dir", tmp_path / "r"]
    assert_one_line(run("distill.py", *common, "--teacher-ds-config", bad_zero), "zero_optimization.overlap_com")
    assert_one_line(
        run("cache_teacher.py", "--shards", root / "shards", "--out", tmp_path / "o", "--teacher-ds-config", bad_zero),
        "zero_optimization.overlap_com",
    )
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()


def test_a_sort_group_below_one_is_refused_before_the_teacher_loads(tiny, tmp_path):
    root, _, teacher = tiny
    out = tmp_path / "o"
    result = run("cache_teacher.py", "--shards", root / "shards", "--out", out, "--teacher", teacher, "--sort-group", 0)
    assert_one_line(result, "--sort-group must be at least 1")
    assert not out.exists()


def test_the_shipped_deepspeed_configs_pass_the_check():
    from disco_dist.cluster.ds_config import load_ds_config

    for shipped in (REPO / "ds_configs").glob("*.json"):
        load_ds_config(shipped)  # the shipped configs pass the same check


def test_hub_id_while_offline_is_one_quick_line(tiny, tmp_path):
    """No network (as on many cluster nodes; here a closed local port stands in for the hub): one line within
    seconds, not a minute of retries ending in a traceback."""
    import time

    root, _, teacher = tiny
    start = time.time()
    result = distill(
        shards=root / "shards",
        student="someone/no-such-model",
        teacher=teacher,
        run_dir=tmp_path / "r",
        env={"HF_ENDPOINT": "http://127.0.0.1:9"},
    )
    assert time.time() - start < 30
    assert_one_line(result, "someone/no-such-model", "hub cannot be reached", "fetch_models.py")
