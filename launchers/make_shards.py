"""Turn a text corpus (one sentence per line, optionally .gz) into shuffled WebDataset shards + index.json.

    python launchers/make_shards.py --out shards/wiki10k --limit 10000
    python launchers/make_shards.py --corpus my_sentences.txt.gz --out shards/mine --shard-size 5000 --seed 1

Empty and duplicate lines and undecodable bytes are dropped and counted; text is never truncated.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from disco_dist.data import resolve_data_root  # noqa: E402
from disco_dist.errors import exit_on_user_error  # noqa: E402
from disco_dist.shards import make_shards  # noqa: E402

DEFAULT_CORPUS = "wiki/wiki_en_sentences_1m.txt.gz"


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", help=f"text file (default: <data root>/{DEFAULT_CORPUS})")
    parser.add_argument("--data-root", help="data folder (default: $DISCO_DATA_ROOT or ../shared/data)")
    parser.add_argument("--out", required=True, type=Path, help="shard folder to create")
    parser.add_argument("--limit", type=int, help="keep only the first N usable sentences (a uniform sample "
                        "of a shuffled corpus)")
    parser.add_argument("--shard-size", type=int, default=1000, help="sentences per shard (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards already in --out")
    args = parser.parse_args(argv)
    corpus = Path(args.corpus) if args.corpus else resolve_data_root(args.data_root) / DEFAULT_CORPUS
    make_shards(corpus, args.out, args.shard_size, args.seed, args.limit, args.overwrite)


if __name__ == "__main__":
    main()
