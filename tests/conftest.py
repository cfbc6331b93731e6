"""What the tests share: tiny random models and run inputs built from a config (no downloads), running a
launcher and checking its one-line error, running a function on 2 gloo ranks, reading TensorBoard scalars."""

import os
import shutil
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the same numbers on every machine: --precision auto would pick bf16 on some CPUs and fp32 on others
# (tests of auto and bf16 pass the flag themselves)
os.environ["DISCO_PRECISION"] = "fp32"

WORDS = """a an the is are was were be been of to in on at for with by from and or but not no this that these
those it its he she they we you i his her their our man woman men women child children dog dogs cat cats
person people boy girl playing plays play running runs run walking walks eating eats sitting sits standing
riding rides car bike horse ball water street beach park field house table guitar piano music song game
big small young old red blue green black white two three one some many all other new good first last
said says year years city time day world school team film album music state war government country
""".split()


def build_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    # every printable ASCII character (and its ## continuation) is in the vocabulary, so distinct sentences
    # rarely collapse to the same token ids (which would make similarity ties that rounding reorders)
    chars = [c for c in string.printable if not c.isspace() and not c.isupper()]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS)) + chars + [f"##{c}" for c in chars]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=64)
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_model(folder: Path, hidden=32, layers=4, seed=0, max_length=64):
    """A random BERT of the given width/depth with the test tokenizer, saved as a model folder."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = build_tokenizer(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_length + 2,
    )
    BertModel(config).save_pretrained(folder)
    return folder


PROMPT = "Instruct: find sentences that mean the same\nQuery: "


def build_tiny_decoder(folder: Path, hidden=64, layers=2, seed=0, padding_side="left", prompt=PROMPT, max_length=24):
    """A random Qwen3 decoder embedder as a sentence-transformers folder (see bench/memory.py random_decoder)."""
    from disco_dist.bench.memory import random_decoder

    return random_decoder(
        folder,
        WORDS,
        hidden=hidden,
        layers=layers,
        seed=seed,
        padding_side=padding_side,
        prompt=prompt,
        max_length=max_length,
    )


# mixed lengths, a line that is empty after stripping, and one far longer than the max length
PROBE_SENTENCES = [
    "a man is playing a guitar",
    "two dogs run",
    "   ",
    "the old woman said the new film was good",
    " ".join(["a big red dog plays in the park with the children"] * 6),
    "cat",
]


def build_tiny_run_inputs(root: Path, sentences: list, shard_size: int, student_layers: int = 2):
    """What a distillation run needs, tiny: a student (32 wide), a teacher (48 wide, so a projection is needed),
    a corpus file and its shards. Returns (root, student, teacher, corpus); shards are in root/"shards"."""
    from disco_dist.data.make_shards import make_shards

    student = build_tiny_model(root / "student", hidden=32, layers=student_layers, seed=0)
    teacher = build_tiny_model(root / "teacher", hidden=48, layers=2, seed=1)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(sentences) + "\n")
    make_shards(corpus, root / "shards", shard_size=shard_size, log=lambda *_: None)
    return root, student, teacher, corpus


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_student"), hidden=32, layers=4, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_teacher"), hidden=48, layers=2, seed=1)


@pytest.fixture(scope="session")
def data_root():
    from disco_dist.data.paths import resolve_data_root

    return resolve_data_root()


def run(script, *args, env=None):
    """launchers/<script> with `args`, in the repository, as a user runs it."""
    result = subprocess.run(
        [sys.executable, str(REPO / "launchers" / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=None if env is None else {**os.environ, **env},
    )
    return result


def assert_same_weights(a: dict, b: dict) -> None:
    """What "a resumed (requeued, moved, cross-node) run ends with the uninterrupted run's weights" means in every
    test: the same tensors to atol 1e-6 and rtol 1e-5. Measured bit-equal on the machines the suite runs on; the
    tolerance leaves room for a CPU library's last bit across processes, not for a run that trained on other
    data or targets (docs/reliability.md, 'What equal means')."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def assert_one_line(result, *needles):
    """Exit 2 with exactly one `error:` line, holding every needle, and no traceback."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def scalars(run_dir):
    """{tag: {step: value}} of a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _worker(rank, world_size, port, fn, args, out_dir):
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()
    # the result is on disk: leave without the interpreter teardown, where gloo's threads occasionally abort
    # the process ("terminate called without an active exception") after a run that succeeded
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(fn, world_size, tmp_path, *args):
    """fn(rank, world_size, *args) on each rank (a module-level function) over gloo; [result of rank 0, ...]."""
    import torch
    import torch.multiprocessing as mp

    from disco_dist.cluster.distributed import free_port

    mp.spawn(_worker, args=(world_size, free_port(), fn, args, str(tmp_path)), nprocs=world_size, join=True)
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


TEST_NODES = 3  # jobs run on two; the third takes a requeued job while a lost node is down


def start_cluster() -> dict:
    """The local SLURM cluster with its three namespace nodes (slurm/local-cluster.sh start --nodes 3, idempotent;
    .ci/run starts it the same way): the environment its commands need."""
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        pytest.skip("SLURM packages not installed (slurm/local-cluster.sh install; .ci/run does it)")
    cluster = REPO / "slurm" / "local-cluster.sh"
    started = subprocess.run(
        ["bash", str(cluster), "start", "--nodes", str(TEST_NODES)], capture_output=True, text=True, timeout=300
    )
    assert started.returncode == 0, started.stderr
    conf = [line.split("=", 1)[1] for line in started.stdout.splitlines() if line.startswith("export SLURM_CONF=")][0]
    return {**os.environ, "SLURM_CONF": conf, "PYTHON": sys.executable, "DISCO_REPO": str(REPO)}
