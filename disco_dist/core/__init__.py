"""Helpers every wing uses: one-line user errors, repository paths, iteration, progress lines, the hardware record."""
