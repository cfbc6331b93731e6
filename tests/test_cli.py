"""Bad flags, paths and combinations: one clear line naming the thing, exit 2, no traceback."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, build_tiny_run_inputs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root, student, teacher, _ = build_tiny_run_inputs(tmp_path_factory.mktemp("cli"),
                                                      [f"sentence {i}" for i in range(100)], shard_size=50)
    return root, student, teacher


def run(script, *args, env=None):
    result = subprocess.run([sys.executable, str(REPO / "launchers" / script), *map(str, args)], capture_output=True,
                            text=True, timeout=300, cwd=REPO, env=None if env is None else {**os.environ, **env})
    return result


def assert_one_line(result, *needles):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_missing_shard_folder(tmp_path):
    assert_one_line(run("distill.py", "--shards", tmp_path / "nope", "--run-dir", tmp_path / "r"), "nope", "make_shards")


def test_missing_student_folder(tiny, tmp_path):
    root, _, teacher = tiny
    assert_one_line(run("distill.py", "--shards", root / "shards", "--student", tmp_path / "no" / "student",
                        "--teacher", teacher, "--run-dir", tmp_path / "r"), "does not exist")


def test_width_mismatch_without_projection(tiny, tmp_path):
    root, student, teacher = tiny
    assert_one_line(run("distill.py", "--shards", root / "shards", "--student", student, "--teacher", teacher,
                        "--head", "none", "--run-dir", tmp_path / "r"), "--head none", "32", "48")


def test_cached_mode_without_embeddings(tiny, tmp_path):
    root, student, _ = tiny
    assert_one_line(run("distill.py", "--shards", root / "shards", "--student", student, "--teacher-mode", "cached",
                        "--run-dir", tmp_path / "r"), "no teacher embeddings")


def test_bad_flag_values_and_combinations(tmp_path):
    assert_one_line(run("distill.py", "--batch-size", 0), "--batch-size")
    assert_one_line(run("distill.py", "--loss", "l1"), "--loss")
    assert_one_line(run("finetune.py", "--select", "best", "--eval-every", 0), "--select best")
    assert_one_line(run("distill.py", "--ds-config", tmp_path / "x.json"), "x.json")
    assert_one_line(run("distill.py", "--logit-scale-lr", 0), "--logit-scale-lr must be positive")
    assert_one_line(run("distill.py", "--loss", "mse", "--logit-scale-lr", 0.01), "learns no logit scale")
    assert_one_line(run("finetune.py", "--logit-scale-lr", 0.01), "--learnable-temperature")


def test_config_file_keys_and_precedence(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"batch-size": 8, "no_such_flag": 1}))
    assert_one_line(run("distill.py", "--config", config), "no_such_flag")
    from disco_dist.config import distill_parser, parse

    config.write_text(json.dumps({"batch_size": 8, "lr": 0.001, "shards": "somewhere"}))
    args = parse(distill_parser(), ["--config", str(config), "--lr", "0.002"])
    assert (args.batch_size, args.lr, str(args.shards)) == (8, 0.002, "somewhere")


def test_unwritable_run_folder(tiny, tmp_path):
    root, student, teacher = tiny
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_one_line(run("distill.py", "--shards", root / "shards", "--student", student, "--teacher", teacher,
                        "--run-dir", blocker / "run"), "is not writable", "a-file")


def test_deepspeed_config_with_unknown_or_bad_keys(tiny, tmp_path):
    """DeepSpeed ignores unknown top-level keys: a typo would silently train without ZeRO. Refused in one line,
    for the student's config, the teacher's, and the cache pass's, before any rank starts."""
    root, student, teacher = tiny
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    bad_zero = tmp_path / "bad-zero.json"
    bad_zero.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_com": True}}))
    common = ["--shards", root / "shards", "--student", student, "--teacher", teacher, "--run-dir", tmp_path / "r"]
    assert_one_line(run("distill.py", *common, "--ds-config", typo), "typo.json", "unknown key(s) zero_optimisation")
    assert_one_line(run("finetune.py", "--student", student, "--ds-config", typo), "zero_optimisation")
    assert_one_line(run("distill.py", *common, "--teacher-ds-config", bad_zero), "zero_optimization.overlap_com")
    assert_one_line(run("cache_teacher.py", "--shards", root / "shards", "--out", tmp_path / "o",
                        "--teacher-ds-config", bad_zero), "zero_optimization.overlap_com")
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()
    from disco_dist.teacher import load_ds_config

    for shipped in (REPO / "ds_configs").glob("*.json"):
        load_ds_config(shipped)  # the shipped configs pass the same check


def test_hub_id_while_offline_is_one_quick_line(tiny, tmp_path):
    """No network (as on many cluster nodes; here a closed local port stands in for the hub): one line within
    seconds, not a minute of retries ending in a traceback."""
    import time

    root, _, teacher = tiny
    start = time.time()
    result = run("distill.py", "--shards", root / "shards", "--student", "someone/no-such-model", "--teacher", teacher,
                 "--run-dir", tmp_path / "r", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert time.time() - start < 30
    assert_one_line(result, "someone/no-such-model", "hub cannot be reached", "fetch_models.py")
