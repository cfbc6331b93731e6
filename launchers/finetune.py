"""Stage 2: supervised contrastive fine-tuning on NLI triplets.

    deepspeed --num_gpus 2 launchers/finetune.py --student runs/distill/final
    python launchers/finetune.py --help

On CPU, `deepspeed --num_gpus N` starts N CPU ranks (gloo, fp32); give each OMP_NUM_THREADS=1.
"""

from disco_dist.cli.commands import main

if __name__ == "__main__":
    main("finetune", description=__doc__)
