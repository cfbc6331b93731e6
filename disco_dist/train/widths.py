"""The Matryoshka widths a student is trained at, and their loss weights, checked once."""

from ..core.errors import UserError


def matryoshka_weights(dims: list, weights: list | None) -> list | None:
    """The checked (dims, weights) pairs of a run, widest first, or None without --matryoshka-dims."""
    if not dims:
        if weights:
            raise UserError("--matryoshka-weights without --matryoshka-dims; give the widths too")
        return None
    if any(d < 1 for d in dims) or len(set(dims)) != len(dims):
        raise UserError(f"--matryoshka-dims {' '.join(map(str, dims))}: give distinct positive widths")
    weights = weights or [1.0] * len(dims)
    if len(weights) != len(dims) or any(w < 0 for w in weights) or not any(weights):
        raise UserError(
            f"--matryoshka-weights: give {len(dims)} non-negative weight(s), one per width, not all 0 "
            f"(got {' '.join(map(str, weights))})"
        )
    return sorted(zip(dims, weights), reverse=True)
