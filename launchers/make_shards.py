"""Turn a text corpus (one sentence per line, optionally .gz) into shuffled WebDataset shards + index.json.

    python launchers/make_shards.py --out shards/wiki10k --limit 10000
    python launchers/make_shards.py --corpus my_sentences.txt.gz --out shards/mine --shard-size 5000 --seed 1

Empty and duplicate lines and undecodable bytes are dropped and counted; text is never truncated.
"""

from disco_dist.cli.commands import main

if __name__ == "__main__":
    main("make_shards", description=__doc__)
