"""Where a stage-1 training step's time goes: torch.profiler over a rank's share of this machine.

One process, one thread (what each of 2 ranks gets on 2 cores), the S2 student (MiniLM-L6's layers 0, 2, 5)
with its 384 -> 768 head, CKD against a full 65,536-key queue, fused AdamW, batches of 64 length-bucketed as
the loader does it (16 batches' worth of sentences sorted by length). No communication: the all-reduce and
the wait for the slower rank are in the training run's `time/wait_share` and `time/comm_share`.

    python -m disco_dist.bench.profile_step --precision fp32 --unpadded off    # the step as it was before 2026-12-02
    python -m disco_dist.bench.profile_step --precision bf16 --unpadded auto   # prints ms/step and the table
    python -m disco_dist.bench.profile_step --precision bf16 --freeze-word-embeddings   # what their gradient costs
"""

import argparse
import gzip
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from ..core.errors import exit_on_user_error

KINDS = {  # aten op -> what it is, for the table; the rest is "other"
    "matmul (dense layers, head, loss)": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention kernel": ("aten::_scaled_dot_product_flash_attention_for_cpu", "flash_attention_for_cpu_backward"),
    "softmax (eager attention)": ("aten::_softmax", "aten::_softmax_backward_data"),
    "dropout masks": ("aten::bernoulli_",),
    "optimizer (AdamW)": ("aten::_fused_adamw_", "aten::addcdiv_", "aten::lerp_", "aten::sqrt", "aten::addcmul_"),
    "LayerNorm": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "GELU": ("aten::gelu", "aten::gelu_backward"),
    "unpadding (scatter/gather)": ("aten::index", "aten::index_put_", "aten::nonzero", "aten::_index_put_impl_"),
    "dtype casts and copies": ("aten::copy_", "aten::_to_copy"),
}


def bucketed_batches(corpus: str, batch_size: int, batches: int, bucket: int = 16) -> list:
    with gzip.open(corpus, "rt") as lines:
        sentences = [line.strip() for _, line in zip(range(batch_size * bucket), lines)]
    sentences.sort(key=len)
    groups = [sentences[i : i + batch_size] for i in range(0, len(sentences), batch_size)]
    return [groups[(i * 5) % len(groups)] for i in range(batches)]  # short, long and middling batches alike


@exit_on_user_error
def main(argv=None) -> None:
    from ..data.paths import resolve_data_root
    from ..models.encoder import Encoder
    from ..train.losses import ckd_loss
    from ..train.student import Student

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--unpadded", choices=("auto", "off"), default="auto")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (and as many profiled)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--freeze-word-embeddings", action="store_true", help="no gradient for the word embeddings")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    corpus = str(resolve_data_root(None) / "wiki" / "wiki_en_sentences_100k.txt.gz")
    batches = bucketed_batches(corpus, args.batch_size, args.steps)
    encoder = Encoder.from_pretrained("all-MiniLM-L6-v2", keep=[0, 2, 5], max_length=128)
    student = Student(encoder, torch.nn.Linear(384, 768), bf16=args.precision == "bf16", unpadded=args.unpadded)
    student.train()
    encoder.model.embeddings.word_embeddings.requires_grad_(not args.freeze_word_embeddings)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4, fused=True)
    queue = F.normalize(torch.randn(65_536, 768), dim=-1)
    tokenized = [encoder.tokenize(batch) for batch in batches]
    targets = [F.normalize(torch.randn(len(batch), 768), dim=-1) for batch in batches]

    def step(i: int) -> None:
        batch = tokenized[i % len(batches)]
        with torch.profiler.record_function("forward"):
            (out,) = student(batch["input_ids"], batch["attention_mask"])
        with torch.profiler.record_function("loss"):
            loss = ckd_loss(out, targets[i % len(batches)], torch.tensor(20.0), queue, this_rank=0)
        with torch.profiler.record_function("backward"):
            loss.backward()
        with torch.profiler.record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step(0), step(1)  # warm-up
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    seconds = (time.perf_counter() - start) / args.steps
    real = sum(int(b["attention_mask"].sum()) for b in tokenized)
    padded = sum(b["attention_mask"].numel() for b in tokenized)
    print(
        f"{args.precision}, unpadded {args.unpadded} ({'on' if encoder.unpadded else 'off'})"
        f"{', word embeddings frozen' if args.freeze_word_embeddings else ''}: "
        f"{seconds * 1000:.0f} ms/step, {args.batch_size / seconds:.1f} sentences/s on one thread; "
        f"{real / padded:.0%} of the padded token positions are real"
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for i in range(args.steps):
            step(i)
    events = profile.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    phases = {e.key: e.cpu_time_total for e in events if e.key in ("forward", "loss", "backward", "optimizer")}
    kinds = defaultdict(float)
    for event in events:
        kind = next((k for k, ops in KINDS.items() if event.key in ops), "other")
        kinds[kind] += event.self_cpu_time_total
    print("phase       share")
    for name in ("forward", "loss", "backward", "optimizer"):
        print(f"{name:<11} {phases.get(name, 0) / total:6.1%}")
    print("\nkind of work (self time)             share")
    for kind, time_us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<37} {time_us / total:6.1%}")


if __name__ == "__main__":
    main()
