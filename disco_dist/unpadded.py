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

from .encoder import transformer_layers


def supports(model) -> bool:
    """A BERT-family encoder (self-attention only, absolute positions) this forward computes exactly."""
    config = model.config
    return (
        config.model_type == "bert"
        and not config.is_decoder
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        and hasattr(model, "embeddings")
    )


def forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
    """What `model(input_ids, attention_mask)` gives the pooling: `.last_hidden_state` (batch, length, hidden),
    zeros at padding; `.pooler_output` is not computed."""
    real = attention_mask.bool()
    batch, length = input_ids.shape
    embeddings = model.embeddings
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)[real]
    ids = input_ids[real]
    x = (
        embeddings.word_embeddings(ids)
        + embeddings.token_type_embeddings(torch.zeros_like(ids))
        + embeddings.position_embeddings(positions)
    )
    x = embeddings.dropout(embeddings.LayerNorm(x))
    keys = real[:, None, None, :]  # every query position attends to its sentence's real tokens
    parent, attr = transformer_layers(model)
    for layer in getattr(parent, attr):
        x = _layer(layer, x, real, keys)
    out = x.new_zeros(batch, length, x.shape[-1])
    out[real] = x
    return SimpleNamespace(last_hidden_state=out, pooler_output=None)


def _layer(layer, x: torch.Tensor, real: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    attention = layer.attention.self
    batch, length = real.shape
    heads, size = attention.num_attention_heads, attention.attention_head_size

    def padded(tokens: torch.Tensor) -> torch.Tensor:  # (tokens, hidden) -> (batch, heads, length, size)
        out = tokens.new_zeros(batch, length, tokens.shape[-1])
        out[real] = tokens
        return out.view(batch, length, heads, size).transpose(1, 2)

    context = F.scaled_dot_product_attention(
        padded(attention.query(x)),
        padded(attention.key(x)),
        padded(attention.value(x)),
        attn_mask=keys,
        dropout_p=attention.dropout.p if attention.training else 0.0,
        scale=attention.scaling,
    )
    context = context.transpose(1, 2).reshape(batch, length, heads * size)[real]
    attended = layer.attention.output(context, x)  # dense, dropout, LayerNorm(+ x)
    return layer.output(layer.intermediate(attended), attended)  # dense + act, dense, dropout, LayerNorm(+)
