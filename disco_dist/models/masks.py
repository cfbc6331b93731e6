"""Padding masks made so that the host never asks the device about them: the attention bias a model takes, and the
flat positions of a batch's real tokens. On a GPU, a question about a tensor's values (`mask.all()`, boolean-mask
indexing, `nonzero`) makes the host wait for every kernel queued before it."""

import torch


def token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """The flat positions (row * length + column) of the real tokens of a (batch, length) mask. Computed on the host
    where the batch is made, it lets the padding-free forward (unpadded.py) gather and scatter tokens without
    asking the device how many there are (boolean-mask indexing does, several times a layer)."""
    return attention_mask.reshape(-1).nonzero().squeeze(1)


# Model types whose attention mask is padding only and that take a ready 4-D mask as is (transformers'
# `create_bidirectional_mask`); checked against transformers' own mask in tests/test_masks.py. Others (DeBERTa's mask
# enters its embeddings, ModernBERT's has a sliding window, a decoder's is causal) get their 2-D mask.
PADDING_ONLY = frozenset(
    {"bert", "mpnet", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "distilbert", "electra", "albert"}
)


def attention_bias(model, attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """The padding mask as the model's attention takes it, built here rather than by transformers, whose builder
    asks the device whether a batch has any padding (`mask.all()`) at every forward. A bidirectional encoder of a
    `PADDING_ONLY` type with SDPA gets a (batch, 1, 1, length) boolean mask, with eager attention the same as an
    additive bias; any other model (or attention) its 2-D mask as is."""
    config = model.config
    if causal or getattr(config, "is_decoder", False) or config.model_type not in PADDING_ONLY:
        return attention_mask
    keys = attention_mask[:, None, None, :].bool()
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == "sdpa":
        return keys
    if implementation == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(keys.shape, dtype=dtype, device=keys.device).masked_fill(~keys, torch.finfo(dtype).min)
    return attention_mask
