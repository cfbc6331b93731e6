"""A padding-free forward for BERT-family encoders (BERT, MiniLM): the dense layers see real tokens only.

A batch padded to its longest sentence spends the padding's share of every matrix product on nothing: on
length-bucketed Wikipedia batches of 64, 46 token positions per sentence for 32 real ones. Here the embeddings
and every dense layer run on the (real tokens, hidden) matrix; only attention, a small part of the FLOPs,
sees the padded (batch, heads, length, length) layout, rebuilt in each layer by one scatter and read back by
one gather. Same modules, same weights, the model's own results to float rounding
(tests/test_unpadded.py); only the dropout draws differ, as fewer are drawn.
"""

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .layers import transformer_layers
from .masks import token_index


def supports(model) -> bool:
    """A BERT-family encoder (self-attention only, absolute positions) this forward computes exactly."""
    config = model.config
    return (
        config.model_type == "bert"
        and not config.is_decoder
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        and hasattr(model, "embeddings")
    )


def forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, index: torch.Tensor | None = None):
    """What `model(input_ids, attention_mask)` gives the pooling: `.last_hidden_state` (batch, length, hidden),
    zeros at padding; `.pooler_output` is not computed. `index`: `token_index(attention_mask)` on the model's device
    (found here when not given)."""
    batch, length = input_ids.shape
    index = token_index(attention_mask) if index is None else index
    embeddings = model.embeddings
    positions = index % length
    ids = input_ids.reshape(-1).index_select(0, index)
    x = (
        embeddings.word_embeddings(ids)
        + embeddings.token_type_embeddings(torch.zeros_like(ids))
        + embeddings.position_embeddings(positions)
    )
    x = embeddings.dropout(embeddings.LayerNorm(x))
    keys = attention_mask.bool()[:, None, None, :]  # every query position attends to its sentence's real tokens
    parent, attr = transformer_layers(model)
    for layer in getattr(parent, attr):
        x = _layer(layer, x, index, keys, (batch, length))
    return SimpleNamespace(last_hidden_state=_scatter(x, index, batch, length), pooler_output=None)


def _scatter(tokens: torch.Tensor, index: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """(tokens, hidden) -> (batch, length, hidden), zeros at padding."""
    out = tokens.new_zeros(batch * length, tokens.shape[-1]).index_copy(0, index, tokens)
    return out.view(batch, length, tokens.shape[-1])


def _layer(layer, x: torch.Tensor, index: torch.Tensor, keys: torch.Tensor, shape: tuple) -> torch.Tensor:
    attention = layer.attention.self
    batch, length = shape
    heads, size = attention.num_attention_heads, attention.attention_head_size

    def padded(tokens: torch.Tensor) -> torch.Tensor:  # (tokens, hidden) -> (batch, heads, length, size)
        return _scatter(tokens, index, batch, length).view(batch, length, heads, size).transpose(1, 2)

    context = F.scaled_dot_product_attention(
        padded(attention.query(x)),
        padded(attention.key(x)),
        padded(attention.value(x)),
        attn_mask=keys,
        dropout_p=attention.dropout.p if attention.training else 0.0,
        scale=attention.scaling,
    )
    context = context.transpose(1, 2).reshape(batch * length, heads * size).index_select(0, index)
    attended = layer.attention.output(context, x)  # dense, dropout, LayerNorm(+ x)
    return layer.output(layer.intermediate(attended), attended)  # dense + act, dense, dropout, LayerNorm(+)
