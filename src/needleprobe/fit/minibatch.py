"""The ``minibatch`` solver: the same objective as :mod:`needleprobe.fit.lbfgs`, streamed from the cache.

For caches larger than memory.  Rows are read in contiguous chunk blocks (Zarr
has no memory map, random row gathers are ~25× slower), so shuffling is
two-level: the order of blocks, then rows within a shuffle buffer of a few
blocks.  Every grid value is one column of ``W`` [d, K] and is trained in the
same pass (``X @ W`` costs about one column's read), with Adam on

    J(w, b) = (1/n) Σ_i s_i · logloss(y_i, x_i·w + b) + (l2 / 2) · ||w||²

(minibatch estimate of the data term, exact penalty).  The training seed
drives initialisation and both shuffles.  This is an approximation of the
lbfgs solution (no convergence test); the final objective and gradient over
the whole split are reported so the gap is visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .lbfgs import PathResult

ReadBlock = Callable[[int, int], np.ndarray]
"""(start, stop) → float32 raw rows [stop - start, d] of the train split."""


@dataclass(frozen=True)
class BlockRows:
    """A split's train rows as the minibatch solver reads them: ``read`` blocks of ``block_rows`` of ``n`` raw rows,
    standardised with (``mean``, ``std``)."""

    read: ReadBlock
    n: int
    block_rows: int
    mean: np.ndarray
    std: np.ndarray


@dataclass(frozen=True)
class AdamSettings:
    """The optimiser's settings (``probe.batch_size``, ``probe.num_epochs``, ``probe.learning_rate``) and the shuffle
    buffer, in blocks."""

    batch_size: int
    num_epochs: int
    learning_rate: float
    shuffle_blocks: int = 4


def fit_minibatch(
    rows: BlockRows,
    y: np.ndarray,
    sample_weight: np.ndarray | None,
    l2_grid: Sequence[float],
    settings: AdamSettings,
    *,
    seed: int,
    device: torch.device | str = "cpu",
) -> list[PathResult]:
    read, n, block_rows, mean, std = rows.read, rows.n, rows.block_rows, rows.mean, rows.std
    batch_size, num_epochs, learning_rate = settings.batch_size, settings.num_epochs, settings.learning_rate
    shuffle_blocks = settings.shuffle_blocks
    dev = torch.device(device)
    d, K = mean.shape[0], len(l2_grid)
    gen = torch.Generator().manual_seed(seed)
    W = (torch.randn(d, K, generator=gen, dtype=torch.float32) * 0.01).to(dev).requires_grad_()
    pos = float(y.sum())
    b = torch.full((K,), float(np.log(pos / (n - pos))), device=dev, requires_grad=True)
    l2 = torch.tensor(list(l2_grid), dtype=torch.float32, device=dev)
    opt = torch.optim.Adam([W, b], lr=learning_rate)
    mean_t = torch.from_numpy(mean.astype(np.float32)).to(dev)
    inv_std = torch.from_numpy((1.0 / std).astype(np.float32)).to(dev)
    y_all = torch.from_numpy(y.astype(np.float32))
    s_all = torch.from_numpy(np.ones(n, np.float32) if sample_weight is None else sample_weight.astype(np.float32))
    starts = np.arange(0, n, block_rows)
    steps = 0

    def load(start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stop = min(n, start + block_rows)
        x = (torch.from_numpy(read(start, stop)).to(dev) - mean_t) * inv_std
        return x, y_all[start:stop].to(dev), s_all[start:stop].to(dev)

    for epoch in range(num_epochs):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(starts)
        for g0 in range(0, len(order), shuffle_blocks):
            parts = [load(int(s)) for s in order[g0 : g0 + shuffle_blocks]]
            x = torch.cat([p[0] for p in parts])
            yy = torch.cat([p[1] for p in parts])
            ss = torch.cat([p[2] for p in parts])
            perm = torch.from_numpy(rng.permutation(x.shape[0])).to(dev)
            for i in range(0, x.shape[0], batch_size):
                idx = perm[i : i + batch_size]
                z = x[idx] @ W + b
                data = (ss[idx, None] * torch.nn.functional.binary_cross_entropy_with_logits(
                    z, yy[idx, None].expand_as(z), reduction="none")).mean(0)
                loss = (data + 0.5 * l2 * (W * W).sum(0)).sum()  # columns are independent
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1

    W_, b_ = W.detach(), b.detach()
    # full-split objective and gradient, so the distance from the optimum is on record
    f = torch.zeros(K, dtype=torch.float64, device=dev)
    gw = torch.zeros(d, K, dtype=torch.float64, device=dev)
    gb = torch.zeros(K, dtype=torch.float64, device=dev)
    for start in starts:
        x, yy, ss = load(int(start))
        z = x @ W_ + b_
        f += (ss[:, None] * torch.nn.functional.binary_cross_entropy_with_logits(
            z, yy[:, None].expand_as(z), reduction="none")).sum(0).double()
        r = ss[:, None] * (torch.sigmoid(z) - yy[:, None])
        gw += (x.T @ r).double()
        gb += r.sum(0).double()
    f = f / n + 0.5 * l2.double() * (W_.double() ** 2).sum(0)
    gw = gw / n + l2.double() * W_.double()
    gmax = torch.maximum(gw.abs().amax(0), (gb / n).abs())
    return [
        PathResult(float(l2_grid[k]), W_[:, k].cpu().numpy().astype(np.float32), float(b_[k]), steps, False,
                   float(f[k]), float(gmax[k]))
        for k in range(K)
    ]
