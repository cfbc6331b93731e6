import json

import numpy as np
import pytest
import torch

from disco_dist.core.errors import UserError
from disco_dist.models.encoder import Encoder
from disco_dist.models.layers import keep_layers

SENTENCES = ["a man is playing a guitar.", "the dog runs in the park", "two children play", "a"]


def test_mean_pooling_ignores_padding(tiny_student):
    encoder = Encoder.from_pretrained(tiny_student)
    alone = encoder.encode([SENTENCES[3]])
    batched = encoder.encode(SENTENCES)  # the short sentence is padded here
    torch.testing.assert_close(batched[3], alone[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_keep_layers_builds_smaller_model(tiny_student):
    full = Encoder.from_pretrained(tiny_student)
    kept = Encoder.from_pretrained(tiny_student, keep=[0, 3])
    assert kept.model.config.num_hidden_layers == 2 and len(kept.model.encoder.layer) == 2
    for name, param in kept.model.encoder.layer[1].named_parameters():
        torch.testing.assert_close(param, dict(full.model.encoder.layer[3].named_parameters())[name])
    with pytest.raises(UserError, match="layers 0..3"):
        keep_layers(full.model, [0, 7])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_saved_folder_loads_identically_in_sentence_transformers_and_automodel(tiny_student, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    encoder = Encoder.from_pretrained(tiny_student, pooling=pooling, keep=[1, 2])
    expected = encoder.encode(SENTENCES)
    folder = encoder.save(tmp_path / "student")
    assert not list(tmp_path.glob(".student.partial-*"))

    st = SentenceTransformer(str(folder), device="cpu")
    np.testing.assert_allclose(st.encode(SENTENCES), expected.numpy(), rtol=1e-4, atol=1e-5)

    hf = AutoModel.from_pretrained(folder)
    assert hf.config.num_hidden_layers == 2
    batch = encoder.tokenize(SENTENCES)
    with torch.no_grad():
        hidden = hf(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = hidden[:, 0] if pooling == "cls" else (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=-1), expected, rtol=1e-4, atol=1e-5)

    reloaded = Encoder.from_pretrained(folder)
    assert (reloaded.pooling, reloaded.normalize) == (pooling, True)
    assert json.loads((folder / "disco_dist.json").read_text())["pooling"] == pooling


def test_reads_sentence_transformers_pooling_config(tiny_student, tmp_path):
    Encoder.from_pretrained(tiny_student, pooling="cls", normalize=False, max_length=17).save(tmp_path / "m")
    (tmp_path / "m" / "disco_dist.json").unlink()  # only the sentence-transformers files remain
    encoder = Encoder.from_pretrained(tmp_path / "m")
    assert (encoder.pooling, encoder.normalize, encoder.max_length) == ("cls", False, 17)


def test_missing_model_folder_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Encoder.from_pretrained(str(tmp_path / "nope" / "model"))


def test_batches_are_ordered_by_token_count_not_characters(tiny_student):
    """Characters mislead: a long word of unknown characters is one [UNK] token, short words are one each."""
    encoder = Encoder.from_pretrained(tiny_student)
    sentences = ["a a a a a a a a", "€€€€€€€€€€€€€€€€€€€€€€€€€€€", "a", "a a a"]
    lengths = [len(ids) for ids in encoder.tokenizer(sentences)["input_ids"]]
    assert sorted(range(4), key=lambda i: len(sentences[i])) != sorted(range(4), key=lengths.__getitem__)
    assert encoder.length_order(sentences) == sorted(range(4), key=lengths.__getitem__)
