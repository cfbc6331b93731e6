"""Embed every sentence of a shard folder with the teacher once (ZeRO-3 across the ranks) and write new
shards holding the sentences with their fp16 teacher embeddings; `distill.py` then skips the teacher.

    deepspeed --num_gpus 2 launchers/cache_teacher.py --shards runs/shards --out runs/shards-mpnet
"""

from disco_dist.cli.commands import main

if __name__ == "__main__":
    main("cache_teacher", description=__doc__)
