"""Encoders and the teacher: loading, layers, the padding-free forward, ZeRO-3 partitioning, precision, FLOPs."""
