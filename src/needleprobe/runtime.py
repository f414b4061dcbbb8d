"""Process-wide settings a command needs, set once around the command and restored after.

Torch's thread count and float32 matmul precision belong to the whole
process, so toggling them inside a function that runs on several threads at
once (one per device in a data-parallel fit) would race.  Each command sets
them here, once, before any worker starts.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def fit_settings(cpu: bool = True) -> Iterator[None]:
    """For fitting probes: exact float32 matmuls (no TF32) and, on CPU, one torch thread for the O(n) vector work.

    The solver's products with X run in numpy's BLAS, which keeps its own
    threads; single-threaded, torch's element-wise ops cost a few percent of a
    pass over X, while each OpenMP region can stall for milliseconds on shared
    cores (measured: 2 threads made a whole fit 10x slower on a busy 2-core machine).
    """
    import torch

    precision, threads = torch.get_float32_matmul_precision(), torch.get_num_threads()
    torch.set_float32_matmul_precision("highest")
    if cpu:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.set_num_threads(threads)
