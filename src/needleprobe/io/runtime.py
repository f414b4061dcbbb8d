"""Process-wide settings a command needs, set once around the command and restored after.

Torch's thread count and float32 matmul precision belong to the whole
process, so toggling them inside a function that runs on several threads at
once (one per device in a data-parallel fit) would race.  Each command sets
them here, once, before any worker starts.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def fit_settings(cpu: bool = True) -> Iterator[None]:
    """For fitting probes: exact float32 matmuls (no TF32) and, on CPU, one thread for torch and for numpy's BLAS.

    On CPU the solver's products with X run in numpy's BLAS and its O(n)
    vector work in torch.  Both are memory-bound at this size, and a second
    thread only adds wake-ups that stall on shared cores.  Measured on this
    project's 2-core machine (54,709 × 384 float32): ``X @ p`` 1.70 ms on one
    BLAS thread and on two; the chunked ``X^T r`` 2.2 ms on one, 8.0 ms on two;
    torch's element-wise ops on two threads made a fit up to 10x slower on a busy machine.
    """
    import torch

    precision, threads = torch.get_float32_matmul_precision(), torch.get_num_threads()
    torch.set_float32_matmul_precision("highest")
    blas = contextlib.nullcontext()
    if cpu:
        torch.set_num_threads(1)
        try:
            from threadpoolctl import threadpool_limits

            blas = threadpool_limits(limits=1, user_api="blas")
        except ImportError:  # scikit-learn brings threadpoolctl; without it BLAS keeps its threads
            pass
    try:
        with blas:
            yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.set_num_threads(threads)


def one_malloc_arena(arenas: int = 1) -> bool:
    """glibc: at most ``arenas`` malloc arenas for the process (1 for a fit command, set before Zarr's reader threads
    exist; 0 restores glibc's default, one per thread up to 8 per core).

    Each thread otherwise gets an arena of its own, and memory freed in one (a
    chunk Zarr read on one of its threads) stays resident there instead of being
    reused by the next phase of the fit: measured on a 50 MB layer streamed in a
    48 MB budget, peak RSS grew by 71 MB with an arena per thread and by 48 MB
    with one, at the same speed.  Returns whether the setting was applied (not
    glibc: nothing to do).  Only arenas created later are affected, so call it first.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-8, int(arenas)))  # M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def resolve_device(name: str) -> "torch.device":
    """The device ``probe.device`` names (``auto``: CUDA, else MPS, else CPU)."""
    import torch

    from ..errors import NeedleprobeError

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise NeedleprobeError("probe.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise NeedleprobeError("probe.device is 'mps' but MPS is not available (use 'auto' or 'cpu')")
    return torch.device(name)
