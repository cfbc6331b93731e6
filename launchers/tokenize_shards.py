"""Store a student's token ids in a shard folder, so that stage 1 pads them into batches instead of tokenising.

    python launchers/tokenize_shards.py --shards runs/demo/shards-teacher --student all-MiniLM-L6-v2 \
        --out runs/demo/shards-ids --workers 16

A new folder: the same shards and sentences, teacher embeddings where cached, and each sentence's ids; its
index.json records the tokenizer (a fingerprint), the max length and the pass' rate. A run whose student tokenises
differently tokenises the text, and says so.
"""

from disco_dist.cli.commands import main

if __name__ == "__main__":
    main("tokenize_shards", description=__doc__)
