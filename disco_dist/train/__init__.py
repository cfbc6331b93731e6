"""The training loop and what it uses: stages, losses, optimizer, checkpoints, metrics, Matryoshka widths."""
