"""Probe two levers on the MPNet teacher's forward (measured 2026-12-02), side by side in one process.

    .venv/bin/python scripts/probe_teacher_forward.py --precision fp32     # prints a table of sentences/s

Rows, each over the same length-sorted sentences, repeated in turn (A, B, C, ..., A, B, C, ...):
  eager b16      transformers' MPNet attention (matmul, + relative position bias, + mask, softmax, matmul), batch 16
  sdpa b16       the same attention through F.scaled_dot_product_attention, the bias and mask as one additive mask
  eager tok N    batches filled up to N padded tokens instead of a fixed count of sentences (--budgets)
The SDPA row's embeddings are compared with the eager row's (max abs difference printed).
"""

import argparse
import gzip
import time

import torch
import torch.nn.functional as F
from transformers.models.mpnet import modeling_mpnet

from disco_dist.data.paths import resolve_data_root
from disco_dist.models.encoder import Encoder

EAGER = modeling_mpnet.MPNetSelfAttention.forward


def sdpa_attention(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
    shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
    q, k, v = (layer(hidden_states).view(shape).transpose(1, 2) for layer in (self.q, self.k, self.v))
    mask = position_bias if attention_mask is None else position_bias + attention_mask
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
    return (self.o(context.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size)),)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--teacher", default="all-mpnet-base-v2")
    parser.add_argument("--budgets", type=int, nargs="*", default=[512, 1024], help="token budgets to time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with gzip.open(resolve_data_root(None) / "wiki" / "wiki_en_sentences_100k.txt.gz", "rt") as f:
        sentences = [next(f).strip() for _ in range(args.sentences)]
    encoder = Encoder.from_pretrained(args.teacher).eval()
    encoder.to(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    order = encoder.length_order(sentences)[::-1]  # longest first, as the cache pass batches them
    count = {i: len(encoder.tokenize([sentences[i]])["input_ids"][0]) for i in order}

    def budget(tokens: int) -> list:
        batches = [[]]
        for i in order:  # a batch's padded size: its first (longest) sentence's length times its count
            if batches[-1] and count[batches[-1][0]] * (len(batches[-1]) + 1) > tokens:
                batches.append([])
            batches[-1].append(i)
        return batches

    fixed = [order[s : s + 16] for s in range(0, len(order), 16)]
    plans = {"eager b16": (EAGER, fixed), "sdpa b16": (sdpa_attention, fixed)}
    plans.update({f"eager tok {n}": (EAGER, budget(n)) for n in args.budgets})
    rates, outputs = {name: [] for name in plans}, {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, (attention, batches) in plans.items():
                modeling_mpnet.MPNetSelfAttention.forward = attention
                tokenized = [encoder.tokenize([sentences[i] for i in batch]) for batch in batches]
                start = time.perf_counter()
                out = [encoder(t["input_ids"], t["attention_mask"]) for t in tokenized]
                rates[name].append(len(sentences) / (time.perf_counter() - start))
                outputs[name] = torch.cat(out).float()
    modeling_mpnet.MPNetSelfAttention.forward = EAGER
    difference = (outputs["sdpa b16"] - outputs["eager b16"]).abs().max().item()
    print(f"| variant ({args.precision}, {args.threads} threads) | sentences/s, each repeat | median | vs eager b16 |")
    print("|---|---|---|---|")
    base = sorted(rates["eager b16"])[len(rates["eager b16"]) // 2]
    for name, values in rates.items():
        median = sorted(values)[len(values) // 2]
        print(f"| {name} | {' / '.join(f'{v:.2f}' for v in values)} | {median:.2f} | {median / base:.3f} |")
    print(f"sdpa vs eager embeddings: max abs difference {difference:.2e}")


if __name__ == "__main__":
    main()
