"""Score an encoder on the seven STS tasks (cosine, Spearman x100) and write a JSON file.

    python launchers/evaluate.py all-MiniLM-L6-v2
    python launchers/evaluate.py runs/demo/final --out runs/demo/eval.json
    python launchers/evaluate.py all-MiniLM-L6-v2 --keep-layers 0 2 5 --label minilm-L3
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from disco_dist.encoder import POOLINGS, Encoder  # noqa: E402
from disco_dist.errors import exit_on_user_error  # noqa: E402
from disco_dist.evaluate import TASKS, evaluate_sts, evaluation_record, format_table, write_json_atomic  # noqa: E402


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="local folder, fetched model name, or hub id")
    parser.add_argument("--data-root", help="data folder (default: $DISCO_DATA_ROOT or ../shared/data)")
    parser.add_argument("--pooling", choices=POOLINGS, help="override the pooling the model folder records")
    parser.add_argument("--max-length", type=int, help="max tokens per sentence (default: the model's)")
    parser.add_argument("--keep-layers", type=int, nargs="+", metavar="I", help="keep only these layers (0-based)")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--out", type=Path, help="JSON file to write (default: ./eval_sts.json)")
    parser.add_argument("--label", help="row label in the table (default: the model argument)")
    args = parser.parse_args(argv)

    encoder = Encoder.from_pretrained(args.model, pooling=args.pooling, max_length=args.max_length,
                                      keep=args.keep_layers)
    encoder.to(args.device)
    start = time.time()
    scores = evaluate_sts(encoder, args.data_root, args.tasks, args.batch_size, progress=sys.stderr.isatty())
    label = args.label or args.model
    print(format_table({label: scores}))
    out = args.out or Path("eval_sts.json")
    write_json_atomic(out, {**evaluation_record(args.model, encoder, scores, time.time() - start),
                            "keep_layers": args.keep_layers})
    print(f"wrote {out}")


def _cuda():
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
