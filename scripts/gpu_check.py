"""The GPU check: disco-dist's speed on one GPU, in one command that fits a short slot on an offline GPU machine.

It runs, each under its own time limit and in order of what matters most, and prints a row as each ends:
  cache_mpnet    the teacher-cache pass, mpnet shape, on stored token ids (--profile over 2 sentence groups)
  s2_b256        stage 1, S2 (MiniLM layers 0 2 5 + head) CKD on the cached shards, batch 256, queue 65,536 (--profile)
  s2_b1024       the same at batch 1,024
  cache_4b       the teacher-cache pass with the Qwen3-4B-shape decoder (its last line: tokens, FLOPs, MFU)
  benchmark      `launchers/benchmark.py --gpu --parts st_training teacher_encode --repeats 1`: sentence-transformers
                 and the plain-PyTorch ceiling beside disco-dist
Every log, profile table (`rank-0.top.txt`), trace and the benchmark's rows land under OUT; OUT/gpu_check.json
holds the table. Random weights of the real shapes: speed, never quality.

    python scripts/gpu_check.py prepare --kit runs/gpu-kit            # here: wheels, configs, sentences (~35 MB)
    python3 scripts/gpu_check.py run --kit runs/gpu-kit --out "$OUT"  # there (the device tool, carry runs/gpu-kit)
    python scripts/gpu_check.py run --smoke --out runs/gpu-smoke      # here: every step at toy size, on the CPU
"""

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from disco_dist.report.recipes import flags  # noqa: E402  (the project beside this script)

SHARED_GPU = REPO.parent / "shared" / "gpu"
REAL = {"all-MiniLM-L6-v2": "all-MiniLM-L6-v2-rand", "all-mpnet-base-v2": "all-mpnet-base-v2-rand"}
WEIGHTS = ("*.safetensors", "*.bin", "*.onnx", "*.h5", "*.msgpack", "*.ot", "onnx", "openvino", "desktop.ini")


def write_sentences(path: Path, count: int) -> None:
    """The first `count` sentences of the shared Wikipedia corpus (any prefix is a uniform sample)."""
    corpus = REPO.parent / "shared" / "data" / "wiki" / "wiki_en_sentences_1m.txt.gz"
    with gzip.open(corpus, "rt") as lines, gzip.open(path, "wt") as out:
        for _, line in zip(range(count), lines):
            out.write(line)


def prepare(kit: Path) -> None:
    """Everything the run needs that the GPU machine lacks, in one folder to carry."""
    from disco_dist.models.fetch import fetch_model

    kit.mkdir(parents=True, exist_ok=True)
    subprocess.run(["bash", str(SHARED_GPU / "wheels.sh"), str(kit / "wheels")], cwd=REPO, check=True)
    for name in ("make_random_models.py", "ceiling.py"):
        shutil.copy(SHARED_GPU / name, kit / name)
    for real, rand in REAL.items():  # all but the weights; make_random_models.py draws them there
        shutil.copytree(
            fetch_model(real), kit / "models" / rand, ignore=shutil.ignore_patterns(*WEIGHTS), dirs_exist_ok=True
        )
    write_sentences(kit / "sentences.txt.gz", 40_000)
    print(f"{kit}: {sum(f.stat().st_size for f in kit.rglob('*') if f.is_file()) / 2**20:.1f} MiB to carry")


def smoke_kit(kit: Path) -> None:
    """Toy models of the same kinds (tests/conftest.py builds them) and a few sentences: the run's paths on a CPU."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_decoder, build_tiny_model

    build_tiny_model(kit / "models" / "all-MiniLM-L6-v2-rand", layers=6, max_length=128)
    build_tiny_model(kit / "models" / "all-mpnet-base-v2-rand", hidden=64, layers=2, seed=1, max_length=128)
    build_tiny_decoder(kit / "models" / "qwen3-4b-rand")
    write_sentences(kit / "sentences.txt.gz", 3_000)


class Steps:
    """Runs the steps, each with its own limit, under one deadline; keeps their logs and prints the table."""

    def __init__(self, out: Path, env: dict, deadline: float):
        self.out, self.env, self.deadline, self.rows = out, env, deadline, []
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def run(self, name: str, argv: list, limit: float, read=lambda text: {}) -> str | None:
        limit = min(limit, self.deadline - time.time())
        if limit < 20:
            self.rows.append({"step": name, "rc": None, "seconds": 0, "said": "not run: no time left"})
            return None
        start = time.time()
        try:
            done = subprocess.run(argv, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=limit)
            rc, text = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as cut:
            rc, text = "timeout", (cut.stdout or b"").decode(errors="replace") + (cut.stderr or b"").decode()
        (self.out / "logs" / f"{name}.log").write_text(text)
        row = {"step": name, "rc": rc, "seconds": round(time.time() - start, 1)}
        row.update(read(text) if rc == 0 else {"said": (text.strip().splitlines() or ["(nothing)"])[-1][:200]})
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.rows, indent=1))
        return text if rc == 0 else None

    def table(self) -> str:
        keys = ["step", "rc", "seconds"] + sorted({k for row in self.rows for k in row} - {"step", "rc", "seconds"})
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in self.rows]
        return "\n".join(lines)


def cache_line(text: str) -> dict:
    """The cache pass's last line: sentences/s, real tokens, TFLOP and MFU."""
    found = re.search(r"\(([\d.]+) sentences/s; ([\d,]+) real tokens, ([\d.e+]+) TFLOP, MFU ([\d.]+)%", text)
    if not found:
        return {"said": "no summary line"}
    rate, tokens, tflop, mfu = found.groups()
    return {"sentences_per_s": float(rate), "tokens": int(tokens.replace(",", "")), "mfu_pct": float(mfu)}


def step_lines(text: str) -> dict:
    """Stage 1's last step line (sentences/s) and its profile line (ms a step)."""
    rates = re.findall(r"^step \d+/\d+ .*?([\d.]+) sent/s", text, re.M)
    profiled = re.search(r"profiled steps \S+ on rank 0 \(\S+\): ([\d.]+) ms a step", text)
    return {
        "sentences_per_s": float(rates[-1]) if rates else None,
        "profiled_ms_a_step": float(profiled.group(1)) if profiled else None,
    }


def run(kit: Path, out: Path, smoke: bool, minutes: float) -> None:
    deadline = time.time() + minutes * 60
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work" if smoke else Path("/tmp/gpu-check")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if smoke:
        smoke_kit(kit)
        launcher = Path(sys.executable).with_name("deepspeed")
    else:  # the machine's python3 with the carried wheels beside its own packages
        site = Path("/tmp/site")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)]
        subprocess.run(pip + sorted(str(w) for w in (kit / "wheels").glob("*.whl")), check=True)
        env.update(PYTHONPATH=f"{site}:{REPO}", PATH=f"{site / 'bin'}:{env['PATH']}")
        subprocess.run([sys.executable, "make_random_models.py"], cwd=kit, env=env, check=True)
        launcher = site / "bin" / "deepspeed"
    student, teacher, decoder = (
        kit / "models" / name for name in ("all-MiniLM-L6-v2-rand", "all-mpnet-base-v2-rand", "qwen3-4b-rand")
    )
    if smoke:
        size = dict(sentences=2_000, shard=250, queue=256, batches=(4, 16), steps=(8, 6), windows=("4:6", "3:5"))
        size.update(decoder=200, bench=dict(steps=4, warmup_steps=2, teacher_sentences=256, batch_size=8))
    else:
        size = dict(sentences=40_000, shard=5_000, queue=65_536, batches=(256, 1024), steps=(80, 40))
        size.update(windows=("60:65", "30:33"), decoder=2_000, bench=dict(gpu=True))
    steps = Steps(out, env, deadline)
    corpus = kit / "sentences.txt.gz"
    shards, ids, cached, few, big = (work / n for n in ("shards", "ids", "teacher", "few", "teacher-4b"))

    def command(script: str, ranks: bool = False, **options) -> list:
        on_ranks = [str(launcher), "--num_gpus", "1"] if ranks else [sys.executable]
        return on_ranks + [str(REPO / "launchers" / script), *map(str, flags(options))]

    def keep_profile(folder: Path, name: str) -> None:
        if (folder / "profile").exists():
            shutil.copytree(folder / "profile", out / "profiles" / name, dirs_exist_ok=True)

    def make_shards(folder: Path, limit: int, shard_size: int) -> list:
        return command("make_shards.py", corpus=corpus, out=folder, limit=limit, shard_size=shard_size, overwrite=True)

    steps.run("shards", make_shards(shards, size["sentences"], size["shard"]), 120)
    workers = os.cpu_count() or 1
    steps.run(
        "token_ids",
        command("tokenize_shards.py", shards=shards, student=student, out=ids, workers=workers, overwrite=True),
        120,
    )
    cache = dict(teacher=teacher, out=cached, overwrite=True, profile="1:3")
    steps.run("cache_mpnet", command("cache_teacher.py", True, shards=ids, **cache), 180, cache_line)
    keep_profile(cached, "cache_mpnet")
    for batch, max_steps, window in zip(size["batches"], size["steps"], size["windows"]):
        run_dir = work / f"s2_b{batch}"
        s2 = dict(shards=cached, student=student, keep_layers=[0, 2, 5], run_dir=run_dir, head_init="random")
        loop = dict(batch_size=batch, queue_size=size["queue"], max_steps=max_steps, epochs=50, log_every=5)
        distill = command("distill.py", True, **s2, **loop, checkpoint_every=0, profile=window)
        steps.run(run_dir.name, distill, 150, step_lines)
        keep_profile(run_dir, run_dir.name)
    steps.run("shards_4b", make_shards(few, size["decoder"], size["decoder"] // 4), 60)
    cache_4b = dict(shards=few, teacher=decoder, out=big, overwrite=True, profile="1:2")
    steps.run("cache_4b", command("cache_teacher.py", True, **cache_4b), 180, cache_line)
    keep_profile(big, "cache_4b")
    models = dict(student=student, teacher=teacher, corpus=corpus, out=out / "benchmarks.json", work_dir=work / "bench")
    bench = command("benchmark.py", parts=["st_training", "teacher_encode"], repeats=1, **models, **size["bench"])
    steps.run("benchmark", bench, 300)
    print(steps.table())
    (out / "gpu_check.md").write_text(steps.table() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("prepare", "run"))
    parser.add_argument("--kit", type=Path, default=REPO / "runs" / "gpu-kit")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check")
    parser.add_argument("--smoke", action="store_true", help="run: toy models on this machine's CPU")
    parser.add_argument("--minutes", type=float, default=9.0, help="run: stop starting steps after this long")
    args = parser.parse_args()
    if args.what == "prepare":
        prepare(args.kit)
    else:
        run(args.out / "kit" if args.smoke else args.kit, args.out, args.smoke, args.minutes)


if __name__ == "__main__":
    main()
