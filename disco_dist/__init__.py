"""disco-dist: distributed DisCo (Distill-Contrast) sentence-embedding distillation."""

__version__ = "0.1.0"
