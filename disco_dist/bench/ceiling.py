"""The ceiling on this device: a plain PyTorch loop doing what a disco-dist row does, with nothing around it.

The benchmark reports each disco-dist rate as a fraction of this loop measured in the same run (and of the
library it replaces): a rate far below the loop is time spent outside the model (the host, the data path,
synchronisation), not a slow GPU. The loop uses the same model, sentences, max length and precision, and none of
disco-dist's savings (training batches in corpus order, each padded to its longest sentence; no length buckets, no
padding-free forward), so a ratio above 1 is possible on sentences of mixed lengths:

  train   the student (`AutoModel`, SDPA/eager as loaded) + a linear head to the teacher's width, mean pooling,
          MSE to the cached teacher embeddings, fused AdamW; every batch tokenised and on the device before the
          clock starts; bf16 autocast where the row is bf16. At each batch size asked for (the row's, and larger
          ones on a GPU); one that does not fit in memory is reported as None.
  encode  the teacher's forward in inference mode, weights in the row's dtype, over the same sentences sorted by
          length in batches of the cache pass's size, all tokenised and on the device first.

Workers of `disco_dist.bench.measure` (`python -m disco_dist.bench.measure ceiling_train SPEC_JSON`).
"""

import time

import torch
import torch.nn.functional as F


def _device_batches(encoder, texts: list, batch_size: int, device) -> list:
    """`texts` in batches of `batch_size`, tokenised and on `device` (only full batches)."""
    batches = []
    for i in range(0, len(texts) - batch_size + 1, batch_size):
        tokens = encoder.tokenize(texts[i : i + batch_size])
        batches.append({k: tokens[k].to(device) for k in ("input_ids", "attention_mask")})
    return batches


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _mean_pool(hidden, mask):
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def train_rate(spec: dict, batch_size: int) -> float | None:
    """Sentences/s of the plain training loop at `batch_size` after `warmup_steps`, over `steps` steps (batches
    are reused in turn); None where it does not fit in the device's memory."""
    from ..data.shards import iter_shard_samples, read_index
    from ..models.encoder import Encoder

    device = torch.device(spec["device"])
    samples = list(iter_shard_samples(read_index(spec["shards"])))
    texts = [t for t, _ in samples]
    targets = torch.stack([torch.from_numpy(e.astype("float32")) for _, e in samples]).to(device)
    torch.manual_seed(0)
    encoder = Encoder.from_pretrained(spec["student"], max_length=spec["max_length"])
    model = encoder.model.to(device).train()
    head = torch.nn.Linear(encoder.dim, targets.shape[1]).to(device)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=spec["lr"], fused=True)
    batches = _device_batches(encoder, texts, batch_size, device)
    if not batches:
        return None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16")
    try:
        for step in range(spec["warmup_steps"] + spec["steps"]):
            if step == spec["warmup_steps"]:
                _sync(device)
                start = time.perf_counter()
            i = step % len(batches)
            batch = batches[i]
            with autocast:
                hidden = model(**batch).last_hidden_state
                pooled = head(_mean_pool(hidden, batch["attention_mask"]))
            target = targets[i * batch_size : (i + 1) * batch_size]
            loss = F.mse_loss(pooled.float(), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _sync(device)
    except torch.OutOfMemoryError:
        return None
    return batch_size * spec["steps"] / (time.perf_counter() - start)


def worker_ceiling_train(spec: dict) -> dict:
    rates = {}
    for batch_size in spec["batch_sizes"]:
        rates[str(batch_size)] = train_rate(spec, batch_size)
        if rates[str(batch_size)] is None:
            break  # larger ones do not fit either
        if spec["device"] == "cuda":
            torch.cuda.empty_cache()
    return {"sentences_per_s": rates}


def worker_ceiling_encode(spec: dict) -> dict:
    """Sentences/s of the teacher's plain forward over the sentences, one warm-up batch first."""
    from ..data.shards import iter_shard_samples, read_index
    from ..models.encoder import Encoder

    device = torch.device(spec["device"])
    texts = [t for t, _ in iter_shard_samples(read_index(spec["shards"]))]
    encoder = Encoder.from_pretrained(spec["teacher"], max_length=spec["max_length"])
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    model = encoder.model.to(device=device, dtype=dtype).eval()
    batch_size = spec["batch_size"]
    ordered = [texts[i] for i in encoder.length_order(texts)]
    batches = [
        {
            k: v.to(device)
            for k, v in encoder.tokenize(ordered[i : i + batch_size]).items()
            if k in ("input_ids", "attention_mask")
        }
        for i in range(0, len(ordered), batch_size)
    ]
    with torch.inference_mode():
        model(**batches[-1])
        _sync(device)
        start = time.perf_counter()
        for batch in batches:
            model(**batch)
        _sync(device)
    return {"sentences_per_s": len(texts) / (time.perf_counter() - start), "batch_size": batch_size}
