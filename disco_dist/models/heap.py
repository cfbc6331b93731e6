"""glibc's heap on a CPU rank: give freed memory back to the OS, so a ZeRO-3 rank's memory is what it holds.

glibc keeps freed blocks in its heap for re-use and raises its mmap threshold (up to 32 MiB) after the first large
free, so memory a rank used once stays counted against it. Measured on a 701 MiB random decoder over 2 CPU ranks
(docs/benchmarks.md, "Teacher memory per rank"): building the partitioned model left each rank holding about the
whole model (1.1 GB against 650 MB), and within a ZeRO-3 forward the freed gather buffers piled up to 470 MiB
while what was live rose by 66 MiB; `malloc_trim` returns all of it. Elsewhere than glibc, these do nothing.
"""

import ctypes
from contextlib import contextmanager

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def give_back_free_heap() -> None:
    """Return the heap's free pages to the OS (a few milliseconds; a teacher forward on a CPU takes seconds)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def give_back_after_each(modules) -> None:
    """Trim the heap after each of these modules' forwards (a ZeRO-3 teacher's layers: measured on 2 CPU ranks,
    a rank's forward peak fell from +470 to +170 MiB over its resting size, for 9% more time)."""
    for module in modules:
        module.register_forward_hook(lambda *_: give_back_free_heap())


@contextmanager
def heap_given_back(while_loading: int = 1 << 20, after: int = 32 << 20):
    """While loading, blocks of 1 MiB or more are mmapped, so zero.Init's full-size construction tensors go back to
    the OS as soon as only the partition is kept; afterwards blocks up to 32 MiB come from the heap again (a fixed
    1 MiB made every ZeRO-3 gather page-fault: forwards 60% slower), and the heap is trimmed."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, while_loading)
    try:
        yield
    finally:
        if _LIBC is not None:
            _LIBC.mallopt(M_MMAP_THRESHOLD, after)
        give_back_free_heap()
