"""Stage 1: KD / contrastive KD from a frozen ZeRO-3 teacher into a student.

    deepspeed --num_gpus 2 launchers/distill.py --shards runs/shards --student all-MiniLM-L6-v2 --keep-layers 0 2 5
    python launchers/distill.py --help

On CPU, `deepspeed --num_gpus N` starts N CPU ranks (gloo, fp32); give each OMP_NUM_THREADS=1.
"""

from disco_dist.cli.commands import main

if __name__ == "__main__":
    main("distill", description=__doc__)
