"""Token ids stored in the shards (disco_dist/data/token_ids.py): made once by `launchers/tokenize_shards.py`, they give
stage 1 the batches tokenising would, so a run trains the same student without tokenising on the host."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_same_weights, build_tiny_decoder, build_tiny_run_inputs, run

from disco_dist.data.shards import iter_shard_samples, read_index
from disco_dist.data.token_ids import pad, token_ids
from disco_dist.models.encoder import Encoder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    sentences = [f"sentence {i} says {' '.join(['word'] * (i % 11))} about the park" for i in range(300)]
    return build_tiny_run_inputs(tmp_path_factory.mktemp("ids"), sentences, shard_size=50)


@pytest.fixture(scope="module")
def tokenized(inputs):
    root, student, _, _ = inputs
    result = run("tokenize_shards.py", "--shards", root / "shards", "--student", student, "--out", root / "ids")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "wrote 300 sentences" in result.stdout
    return root / "ids"


def test_padded_stored_ids_are_the_tokenizer_s_batch(inputs, tmp_path):
    """Right padding (BERT) and left padding with a prompt (a decoder's tokenizer), including a truncated row."""
    _, student, _, _ = inputs
    texts = ["a park", "the man plays " * 40, "", "sentence 7 says word word about the park"]
    for encoder in (
        Encoder.from_pretrained(student, max_length=16),
        Encoder.from_pretrained(build_tiny_decoder(tmp_path / "decoder"), max_length=12),
    ):
        ours = pad(encoder, [np.asarray(row, dtype="<u2") for row in token_ids(encoder, texts)])
        theirs = encoder.tokenize(texts)
        for key in ("input_ids", "attention_mask"):
            assert torch.equal(ours[key], theirs[key]), (encoder.tokenizer.padding_side, key)


def test_the_fingerprint_names_the_tokenizer_not_its_last_call(inputs, tmp_path):
    """transformers resets a tokenizer's truncation and padding state at every call: a student that has tokenised
    (its head's least-squares fit encodes sentences) still matches the ids made by a fresh one; another max length,
    prompt or vocabulary does not."""
    from disco_dist.data.token_ids import fingerprint

    _, student, teacher, _ = inputs
    fresh = fingerprint(Encoder.from_pretrained(student, max_length=64))
    used = Encoder.from_pretrained(student, max_length=64)
    used.tokenize(["a sentence"])
    used.encode(["a sentence", "another, longer sentence than that"], batch_size=1)
    assert fingerprint(used) == fresh
    assert fingerprint(Encoder.from_pretrained(student, max_length=32)) != fresh
    assert fingerprint(Encoder.from_pretrained(student, max_length=64, prompt="query: ")) != fresh
    decoder = build_tiny_decoder(tmp_path / "decoder", max_length=64)
    assert fingerprint(Encoder.from_pretrained(decoder, max_length=64, prompt="")) != fresh


def test_the_pass_refuses_to_write_over_its_source(inputs):
    root, student, _, _ = inputs
    result = run(
        "tokenize_shards.py", "--shards", root / "shards", "--student", student, "--out", root / "shards", "--overwrite"
    )
    assert result.returncode == 2 and "is the source folder" in result.stderr, result.stderr[-2000:]
    assert read_index(root / "shards").total == 300  # untouched


def test_the_pass_keeps_every_sample_and_records_the_tokenizer(inputs, tokenized):
    root, student, _, _ = inputs
    source, made = read_index(root / "shards"), read_index(tokenized)
    tokens = made.meta["tokens"]
    assert tokens["dtype"] == "<u2" and tokens["max_length"] == 64 and len(tokens["fingerprint"]) == 64
    assert [s["samples"] for s in made.shards] == [s["samples"] for s in source.shards]
    encoder = Encoder.from_pretrained(student, max_length=128)  # its tokenizer's limit, 64, is what applies
    samples = list(iter_shard_samples(made, with_keys=True, with_ids=True))
    assert [s[:3] for s in samples] == list(iter_shard_samples(source, with_keys=True))  # same keys, texts
    assert [list(ids) for *_, ids in samples] == token_ids(encoder, [t for _, t, *_ in samples])


def test_a_run_on_tokenized_shards_trains_the_student_a_run_on_text_would(inputs, tokenized, tmp_path):
    """CKD with the online teacher, 12 steps, one rank: the same final weights from the text shards and from the
    tokenised ones; a student of another max length tokenises the text instead, and says so."""
    root, student, teacher, _ = inputs
    common = ["--student", student, "--teacher", teacher, "--batch-size", 8, "--max-steps", 12, "--log-every", 6]
    common += ["--checkpoint-every", 0, "--queue-size", 32, "--head-init-samples", 64, "--progress", "off"]
    env = {"OMP_NUM_THREADS": "1"}
    finals = []
    for name, shards in (("text", root / "shards"), ("ids", tokenized)):
        result = run("distill.py", "--shards", shards, "--run-dir", tmp_path / name, *common, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert "tokenises differently" not in result.stdout
        finals.append(dict(Encoder.from_pretrained(tmp_path / name / "final").named_parameters()))
    assert_same_weights(*finals)

    other = run("distill.py", "--shards", tokenized, "--run-dir", tmp_path / "other", *common, "--max-length", 32)
    assert other.returncode == 0, other.stdout[-2000:] + other.stderr[-3000:]
    assert "max length 64); this student tokenises differently, so the loader tokenises the text" in other.stdout
    summary = json.loads((tmp_path / "other" / "train_summary.json").read_text())
    assert summary["steps"] == 12


def test_the_loader_rate_script_pads_stored_ids_instead_of_tokenising(inputs, tokenized, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    _, student, _, _ = inputs
    out = tmp_path / "rate.json"
    cmd = [sys.executable, "-m", "disco_dist.bench.loader_rate", "--shards", str(tokenized), "--ranks", "1"]
    cmd += ["--student", str(student), "--batch-size", "8", "--consumption", "10", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = json.loads(out.read_text())["rows"]
    assert row["token_ids"] is True and row["sentences"] == (300 // 8) * 8
