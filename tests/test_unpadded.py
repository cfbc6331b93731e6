"""The padding-free forward (disco_dist/models/unpadded.py) computes what the model's own forward computes, values and
gradients, whatever the padding; it is used only where the architecture is one it computes exactly."""

import torch
from conftest import PROBE_SENTENCES

from disco_dist.models import unpadded
from disco_dist.models.encoder import Encoder
from disco_dist.train.student import Student


def _pair(tiny_student):
    padded = Encoder.from_pretrained(tiny_student)
    free = Encoder.from_pretrained(tiny_student)
    free.unpadded = True
    return padded, free


def test_unpadded_forward_equals_the_models_own_values_and_gradients(tiny_student):
    padded, free = _pair(tiny_student)
    assert unpadded.supports(padded.model)
    batch = padded.tokenize(PROBE_SENTENCES)
    assert (batch["attention_mask"] == 0).any()  # the probe has padding to skip
    outputs = []
    for encoder in (padded, free):
        encoder.eval()  # no dropout: the two draw differently
        embeddings = encoder(batch["input_ids"], batch["attention_mask"], normalize=False)
        (embeddings * torch.linspace(-1, 1, embeddings.shape[-1])).sum().backward()
        grads = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
        outputs.append((embeddings.detach(), grads))
    (a, grads_a), (b, grads_b) = outputs
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4, msg=name)


def test_unpadded_hidden_states_are_zero_at_padding_and_left_padding_gives_the_same_real_tokens(tiny_student):
    padded, _ = _pair(tiny_student)
    padded.eval()
    batch = padded.tokenize(PROBE_SENTENCES)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = unpadded.forward(padded.model, batch["input_ids"], batch["attention_mask"]).last_hidden_state
        theirs = padded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-6, rtol=1e-5)
    assert ours[~mask].abs().max() == 0
    # the same sentences padded on the left: the model's positions count from the left edge, padding included
    padded.tokenizer.padding_side = "left"
    left = padded.tokenize(PROBE_SENTENCES)
    with torch.no_grad():
        ours = unpadded.forward(padded.model, left["input_ids"], left["attention_mask"]).last_hidden_state
        theirs = padded.model(input_ids=left["input_ids"], attention_mask=left["attention_mask"]).last_hidden_state
    left_mask = left["attention_mask"].bool()
    torch.testing.assert_close(ours[left_mask], theirs[left_mask], atol=1e-6, rtol=1e-5)


def test_only_architectures_it_computes_exactly_get_the_unpadded_forward(tiny_student, tmp_path):
    from transformers import MPNetConfig, MPNetModel

    mpnet = MPNetModel(MPNetConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    assert not unpadded.supports(mpnet)  # relative position bias: the model's own forward
    student = Encoder.from_pretrained(tiny_student)
    assert Student(student, unpadded="auto").encoder.unpadded
    assert not Student(Encoder.from_pretrained(tiny_student), unpadded="off").encoder.unpadded
    pooler = Encoder.from_pretrained(tiny_student, pooling="pooler")  # the pooler output is not computed there
    assert not Student(pooler, unpadded="auto").encoder.unpadded


def test_training_with_dropout_runs_and_updates_every_layer(tiny_student):
    _, free = _pair(tiny_student)
    free.train()
    batch = free.tokenize(PROBE_SENTENCES)
    free(batch["input_ids"], batch["attention_mask"]).sum().backward()
    unused = [name for name, p in free.named_parameters() if p.grad is None and "pooler" not in name]
    assert unused == []
