"""What a user deploys: a student saved with its head (the teacher's space) that sentence-transformers loads as
it is, scored against its teacher; Matryoshka widths; the model card every saved student carries."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import assert_one_line, build_tiny_run_inputs, run
from scipy.stats import spearmanr

from disco_dist.core.errors import UserError
from disco_dist.core.hardware import hardware
from disco_dist.data.sts import read_sts_task
from disco_dist.evaluation.evaluate import TASKS, TeacherSide, score_sts
from disco_dist.models.encoder import Encoder
from disco_dist.train.losses import ckd_loss, matryoshka_loss, sup_contrastive_loss
from disco_dist.train.student import Student

SENTENCES = ["A man plays the guitar.", "the the the", "Two dogs run in a field of snow.", "Stocks fell sharply."]


@pytest.fixture(scope="module")
def headed(tiny_student, tmp_path_factory):
    """The tiny student (32 wide) saved with a random 32 -> 48 head, as distill.py --keep-head saves one."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 48)
    return Encoder.from_pretrained(tiny_student).save(tmp_path_factory.mktemp("headed") / "final", head=head), head


def test_a_student_saved_with_its_head_loads_in_sentence_transformers_with_equal_embeddings(headed):
    from sentence_transformers import SentenceTransformer

    folder, head = headed
    ours = Encoder.from_pretrained(folder)
    assert ours.dim == 48 and torch.equal(ours.dense.weight, head.weight)
    theirs = SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert theirs.shape == (4, 48)
    assert torch.allclose(ours.encode(SENTENCES), theirs, atol=1e-6)
    # without its head: the encoder's own 32-wide output, as the student was before the head
    assert Encoder.from_pretrained(folder, head=False).encode(SENTENCES).shape == (4, 32)


def test_a_dense_head_with_an_activation_is_refused_in_one_line(headed, tmp_path):
    import shutil

    folder = tmp_path / "tanh"
    shutil.copytree(headed[0], folder)
    config = folder / "2_Dense" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "activation_function": "torch.nn.Tanh"}))
    with pytest.raises(UserError, match="activation torch.nn.Tanh"):
        Encoder.from_pretrained(folder)


def test_an_older_dense_folder_with_pytorch_model_bin_is_read(headed, tmp_path):
    """sentence-transformers before 3.0 saved a Dense as pytorch_model.bin; such a folder computes the same."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "old"
    shutil.copytree(headed[0], folder)
    dense = folder / "2_Dense"
    torch.save(load_file(dense / "model.safetensors"), dense / "pytorch_model.bin")
    (dense / "model.safetensors").unlink()
    expected = Encoder.from_pretrained(headed[0]).encode(SENTENCES)
    assert torch.equal(Encoder.from_pretrained(folder).encode(SENTENCES), expected)


def _mean_pooled(folder, sentences, head=None):
    """Embeddings computed without disco-dist: transformers, mean pooling, the head by hand, normalised."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        pooled = head(pooled) if head is not None else pooled
    return dict(zip(sentences, torch.nn.functional.normalize(pooled, dim=-1)))


def test_the_asymmetric_score_equals_a_hand_computation_and_the_teacher_is_embedded_once(
    headed, tiny_teacher, data_root, tmp_path
):
    folder, head = headed
    cache = tmp_path / "teacher.pt"
    found = score_sts(Encoder.from_pretrained(folder), data_root, ("STS13",), 128,
                      teacher=TeacherSide(str(tiny_teacher), cache, 128))  # fmt: skip
    own = score_sts(Encoder.from_pretrained(folder, head=False), data_root, ("STS13",), 128, dims=(32, 8))
    task, split = TASKS["STS13"]
    pairs = read_sts_task(task, data_root, split)
    unique = list(dict.fromkeys(pairs.sentences1 + pairs.sentences2))
    student, teacher = _mean_pooled(folder, unique, head), _mean_pooled(tiny_teacher, unique)

    def spearman(left, right, width=None):
        cos = [
            torch.nn.functional.cosine_similarity(left[a][:width], right[b][:width], dim=0).item()
            for a, b in zip(pairs.sentences1, pairs.sentences2)
        ]
        return spearmanr(cos, pairs.scores).statistic * 100

    assert found["scores"]["STS13"] == pytest.approx(spearman(student, student), abs=1e-3)
    encoder_own = _mean_pooled(folder, unique)  # the encoder's output without the head, cut to 8 dimensions
    assert own["scores_by_dim"][8]["STS13"] == pytest.approx(spearman(encoder_own, encoder_own, 8), abs=1e-3)
    with pytest.raises(UserError, match="add --no-head"):  # widths of the head's output were never trained
        score_sts(Encoder.from_pretrained(folder), data_root, ("STS13",), 128, dims=(8,))
    with pytest.raises(UserError, match="--dims 64: the model's embeddings have 32"):
        score_sts(Encoder.from_pretrained(folder, head=False), data_root, ("STS13",), 128, dims=(64,))
    both_ways = (spearman(student, teacher) + spearman(teacher, student)) / 2
    assert found["asymmetric"]["STS13"] == pytest.approx(both_ways, abs=1e-3)
    assert found["teacher_scores"]["STS13"] == pytest.approx(spearman(teacher, teacher), abs=1e-3)
    assert found["speed"]["teacher_sentences_per_s"] > 0
    assert found["speed"]["teacher_hardware"] == [hardware()]  # where the cached teacher was timed

    again = TeacherSide(str(tiny_teacher), cache, 128)  # from the cache file: the teacher is never loaded
    assert torch.equal(again.embeddings("STS13", unique), found_embeddings(cache))
    assert again._encoder is None
    with pytest.raises(UserError, match="needs its head"):  # a 32-wide student cannot meet a 48-wide teacher
        score_sts(Encoder.from_pretrained(folder, head=False), data_root, ("STS13",), 128, teacher=again)


def found_embeddings(cache):
    return torch.load(cache, weights_only=True)["tasks"]["STS13"]["embeddings"]


def test_matryoshka_at_one_width_is_the_plain_loss_and_each_width_uses_its_prefix(tiny_student):
    torch.manual_seed(0)
    encoder = Encoder.from_pretrained(tiny_student).eval()
    head, head8 = torch.nn.Linear(32, 48), torch.nn.Linear(8, 48)
    batch = encoder.tokenize(SENTENCES)
    keys = torch.nn.functional.normalize(torch.randn(4, 48), dim=-1)
    queue = torch.nn.functional.normalize(torch.randn(16, 48), dim=-1)
    scale = torch.tensor(20.0)

    def ckd(out, width):
        return ckd_loss(out, keys, scale, queue, this_rank=0)

    (plain,) = Student(encoder, head)(batch["input_ids"], batch["attention_mask"])
    one = Student(encoder, head, dims=(32,))(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(matryoshka_loss(ckd, one, [(32, 1.0)]), ckd(plain, 32))

    two = Student(encoder, head, dims=(32, 8), prefix_heads={8: head8})(batch["input_ids"], batch["attention_mask"])
    pooled = encoder(batch["input_ids"], batch["attention_mask"], normalize=False)
    assert torch.allclose(two[1], head8(pooled[:, :8]))
    total = matryoshka_loss(ckd, two, [(32, 1.0), (8, 0.5)])
    assert torch.allclose(total, ckd(head(pooled), 32) + 0.5 * ckd(head8(pooled[:, :8]), 8))

    # fine-tuning: no heads, the loss on each prefix of the encoder's own output
    prefixes = Student(encoder, dims=(32, 8))(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(prefixes[1], pooled[:, :8])
    loss = matryoshka_loss(
        lambda e, w: sup_contrastive_loss(e[:2], e[2:], None, 0.05, gather=lambda x: x, this_rank=0),
        prefixes,
        [(32, 1.0), (8, 1.0)],
    )
    by_hand = sum(
        sup_contrastive_loss(p[:2], p[2:], None, 0.05, gather=lambda x: x, this_rank=0) for p in (pooled, pooled[:, :8])
    )
    assert torch.allclose(loss, by_hand)
    with pytest.raises(UserError, match="the widest must be the student's width, 32"):
        Student(encoder, dims=(16, 8))


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--matryoshka-dims", "32", "16", "--matryoshka-weights", "1"], "give 2 non-negative weight(s)"),
        (["--matryoshka-weights", "1"], "without --matryoshka-dims"),
        (["--matryoshka-dims", "32", "32"], "distinct positive widths"),
    ],
)
def test_bad_matryoshka_flags_are_one_line(flags, needle, tmp_path):
    assert_one_line(run("distill.py", "--shards", tmp_path, *flags), needle)


def test_the_model_cards_transformers_snippet_computes_what_sentence_transformers_does(headed, tmp_path):
    """The card's 'Usage (transformers)' code, run as printed, gives the model's embeddings, and is formatted as
    `ruff format` wants it (a card copied into docs/ must pass `make lint`)."""
    from disco_dist.report.model_card import render

    folder, _ = headed
    stage = {"stage": "distill", "started_from": "tiny", "teacher": "tiny-teacher", "data": "4 sentences", "steps": 1}
    (folder / "training.json").write_text(json.dumps({"stages": [stage]}))
    card = render(folder).read_text()
    code = re.search(r"## Usage \(transformers\)\s*```python\n(.*?)```", card, re.S).group(1)
    formatted = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--stdin-filename", "card.py", "-"], input=code, text=True
    )
    assert formatted.returncode == 0
    scope = {}
    exec(code, scope)
    expected = Encoder.from_pretrained(folder).encode(["A man is playing a guitar."])
    assert torch.allclose(scope["embeddings"], expected, atol=1e-5)


@pytest.mark.slow
def test_keep_head_and_matryoshka_through_both_stages_then_the_card_carries_the_scores(tmp_path):
    """distill --keep-head --matryoshka-dims on 2 ranks, fine-tuning with the head kept frozen, then evaluate.py
    against the teacher: the saved folders load in sentence-transformers, and the card parses and has the scores."""
    from huggingface_hub import ModelCard
    from sentence_transformers import SentenceTransformer
    from test_train import launch

    pairs = read_sts_task("STSBenchmark", split="train")
    sentences = list(dict.fromkeys(s.strip() for s in pairs.sentences1 + pairs.sentences2))[:400]
    root, student, teacher, _ = build_tiny_run_inputs(tmp_path, sentences, shard_size=100)
    stage1 = tmp_path / "distill"
    common = ["--batch-size", 16, "--max-steps", 6, "--eval-every", 3, "--select", "best", "--precision", "fp32"]
    result = launch(
        "distill.py",
        ["--shards", root / "shards", "--student", student, "--teacher", teacher, "--run-dir", stage1, *common,
         "--queue-size", 64, "--keep-head", "--matryoshka-dims", 32, 16, "--teacher-batch-size", 64],
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"ckd@16 [\d.]+ ckd@32 [\d.]+", result.stdout)
    final = stage1 / "final"
    embeddings = SentenceTransformer(str(final), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert embeddings.shape == (4, 48)
    assert torch.allclose(Encoder.from_pretrained(final).encode(SENTENCES), embeddings, atol=1e-6)
    card = ModelCard.load(final / "README.md")
    assert card.data.library_name == "sentence-transformers" and card.data.pipeline_tag == "sentence-similarity"
    assert "| Matryoshka widths | [32, 16] |" in card.text

    stage2 = tmp_path / "finetune"
    result = launch(
        "finetune.py",
        ["--student", final, "--run-dir", stage2, "--max-triplets", 64, *common, "--student-head", "frozen"],
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tuned = Encoder.from_pretrained(stage2 / "final")
    assert torch.equal(tuned.dense.weight, Encoder.from_pretrained(final).dense.weight)  # the head, unchanged
    assert [s["stage"] for s in json.loads((stage2 / "final" / "training.json").read_text())["stages"]] == [
        "distill",
        "finetune",
    ]

    out = tmp_path / "eval.json"
    result = run("evaluate.py", stage2 / "final", "--against-teacher", teacher, "--out", out, "--batch-size", 128)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    card = ModelCard.load(stage2 / "final" / "README.md")
    assert card.data.base_model == str(student)
    row = next(line for line in card.text.splitlines() if line.startswith("| this model against the teacher"))
    assert f"{record['asymmetric']['avg']:.2f}" in row
    assert f"{record['scores']['avg']:.2f}" in next(
        line for line in card.text.splitlines() if line.startswith("| this model |")
    )


@pytest.mark.parametrize(
    "teacher_machine, expected", [("here", r"\(\d+\.\dx\)\."), ("elsewhere", "not a ratio on one machine")]
)
def test_the_card_states_a_speed_ratio_only_when_both_were_timed_on_one_machine(headed, teacher_machine, expected):
    """A teacher cache timed on another machine (evaluate.py --teacher-cache) gives no student/teacher ratio."""
    from disco_dist.report.model_card import update_model_card

    folder, _ = headed
    stage = {"stage": "distill", "started_from": "tiny", "teacher": "tiny-teacher", "data": "4 sentences", "steps": 1}
    (folder / "training.json").write_text(json.dumps({"stages": [stage]}))
    machine = hardware() if teacher_machine == "here" else "Another CPU, 64 cores, no GPU, torch 2.13.0"
    speed = {"sentences_per_s": 120.0, "teacher_sentences_per_s": 30.0, "teacher": "t", "teacher_hardware": [machine]}
    record = {"scores": {task: 50.0 for task in [*TASKS, "avg"]}, "speed": speed, "hardware": hardware()}
    assert update_model_card(folder, record)
    text = (folder / "README.md").read_text()
    assert re.search(expected, text)
    if teacher_machine == "here":
        assert "(4.0x)." in text
