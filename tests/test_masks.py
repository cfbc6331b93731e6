"""The padding masks made on the host (disco_dist/models/masks.py) give every model the outputs its own mask gives."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModel

from disco_dist.models.masks import PADDING_ONLY, attention_bias, token_index

SMALL = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}


def tiny(model_type: str, implementation: str, **extra):
    config = AutoConfig.for_model(model_type, vocab_size=60, **SMALL, **extra)
    if model_type == "distilbert":  # its own names for the same sizes
        config = AutoConfig.for_model(model_type, vocab_size=60, dim=16, n_layers=2, n_heads=2, hidden_dim=32)
    if model_type == "albert":
        config.embedding_size = 8
    torch.manual_seed(0)
    return AutoModel.from_config(config, attn_implementation=implementation).eval()


def padded_batch():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    ids = torch.randint(5, 60, mask.shape, generator=torch.Generator().manual_seed(1)) * mask
    return ids, mask


# MPNet has eager attention only in transformers
@pytest.mark.parametrize(
    ("model_type", "implementation"),
    [(t, i) for t in sorted(PADDING_ONLY) for i in ("sdpa", "eager") if (t, i) != ("mpnet", "sdpa")],
)
def test_a_padding_only_encoder_gives_its_own_outputs_with_the_host_made_mask(model_type, implementation):
    model = tiny(model_type, implementation)
    ids, mask = padded_batch()
    made = attention_bias(model, mask, causal=False)
    assert made.dim() == 4, "a padding-only encoder gets the ready mask (no device question per forward)"
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = model(input_ids=ids, attention_mask=made).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], own[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("model_type", "extra"), [("deberta-v2", {}), ("modernbert", {}), ("qwen3", {})])
def test_a_model_whose_mask_is_more_than_padding_gets_its_own_2d_mask(model_type, extra):
    """DeBERTa multiplies its mask into the embeddings (a ready 4-D mask made its outputs NaN), ModernBERT adds a
    sliding window, a decoder is causal: they get the 2-D mask and build their own."""
    model = SimpleNamespace(config=AutoConfig.for_model(model_type, **extra))
    _, mask = padded_batch()
    assert attention_bias(model, mask, causal=False) is mask
    assert attention_bias(model, mask, causal=True) is mask


def test_a_decoder_configured_bert_gets_its_2d_mask():
    model = tiny("bert", "sdpa", is_decoder=True)
    _, mask = padded_batch()
    assert attention_bias(model, mask, causal=False) is mask


def test_token_index_lists_the_flat_positions_of_real_tokens():
    _, mask = padded_batch()
    assert token_index(mask).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 14, 15]
