"""launchers/plots.py draws the figures of docs/results.md from a results file and the runs' TensorBoard files,
and says which it skipped for want of inputs."""

import json

from conftest import run
from torch.utils.tensorboard import SummaryWriter

TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STS-B", "SICK-R", "avg")


def scores(avg):
    return {t: avg for t in TASKS}


def test_plots_draws_every_figure_from_results_and_tensorboard(tmp_path):
    run_dir = tmp_path / "distill-ckd"
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for step, value in ((50, 80.0), (100, 82.5)):
            writer.add_scalar("eval/stsb_dev_spearman", value, step)
    distill = {"run_dir": str(run_dir), "steps": 100}
    by_dim = {"384": {"avg": 80.0}, "128": {"avg": 78.0}, "64": {"avg": 75.0}}
    content = {
        "rows": [
            {"student": "teacher", "method": "init", "scores": scores(80.5)},
            {"student": "S2", "method": "ckd", "scores": scores(77.0), "distill": distill},
            {"student": "S2", "method": "disco", "scores": scores(78.9), "scores_by_dim": by_dim},
        ],
        "speed": [{"student": "S2", "batch_size": 128, "speedup": 13.8}],
    }
    results = tmp_path / "results.json"
    results.write_text(json.dumps(content))
    out = tmp_path / "figures"
    result = run("plots.py", "--results", results, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    names = ("dev_curves.png", "sts_tasks.png", "quality_speed.png", "matryoshka.png")
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"wrote {out / name}" in result.stdout

    # without the run folder the curves are skipped, said in one line; the rest is drawn
    content["rows"][1]["distill"]["run_dir"] = str(tmp_path / "elsewhere")
    results.write_text(json.dumps(content))
    result = run("plots.py", "--results", results, "--out", tmp_path / "again")
    assert result.returncode == 0 and "skipped dev_curves.png" in result.stdout
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(set(names) - {"dev_curves.png"})
