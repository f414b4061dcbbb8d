"""The rows a fit reads and the two products the L-BFGS solver takes with them.

Out of core and across processes
--------------------------------
The solver touches ``X`` only in ``X @ p`` and ``X^T r`` (:class:`RowData`); every
other quantity is a vector over rows (z, q, residuals, weights) or over
features.  So the same iterations run when ``X`` is a :class:`RowSource` (rows
read group by group from the cache, see :mod:`needleprobe.fit.streaming`) and when
the rows are split over processes (``comm``: each process holds its rows' part
of every row vector; the sums over rows, that is ``X^T r``, the loss and the
line search's scalars, are combined across processes, so every process holds the
same iterates and takes the same decisions).

Every sum over rows is made independent of how the rows are laid out, so that
in memory, out of core and across processes give the same bits.  Rows are cut
into groups of :func:`group_rows` rows (the size depends only on the total row
count; a process's rows start on a group boundary, so the groups are the same
rows in every layout).  ``X^T r`` is a float32 product per group, added across
groups in float64 as a double-double (TwoSum, the rounding errors kept), and the
processes' double-doubles are added in rank order and rounded once: the float64
rounding of the exact sum of the same group products, whatever the split (a sum
lying within ~1e-32 relative of a rounding midpoint could still differ).  Sums
of vectors over rows (:meth:`RowData.rowsum`) sum each group alone, gather every
group sum in order and sum that one array: the same operations on the same
numbers.  Without this, the float64 association alone (about 1e-16 relative)
let a 2-process fit stop a few iterations apart from the 1-process one on a
nearly separable problem.  The float32 rounding inside a group is what a
different grouping would change, and it moves weak-L2 probes by up to 2e-4
relative (measured on the demo cache), hence the fixed groups.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np
import torch

__all__ = ["Comm", "RowData", "RowSource", "group_rows", "objective"]

_F64 = torch.float64
_CHUNK_ROWS = 4096  # most rows per float32 group of the X^T r product (float64 accumulation across groups)
_MIN_GROUP_ROWS = 64


# Data and the two products with X
# --------------------------------------------------------------------------- #


def group_rows(n_total: int, cuda: bool = False) -> int:
    """Rows per float32 group of ``X^T r``: a power of two from the total row count alone.

    ``n_total / 16`` rounded down to a power of two, between 64 and 4096 (x8 on
    CUDA: fewer kernel launches), so small data still has several groups (and
    several processes each get some) while large data makes few calls.
    """
    g = _MIN_GROUP_ROWS
    while 2 * g <= min(_CHUNK_ROWS, n_total // 16):
        g *= 2
    return g * (8 if cuda else 1)


class RowSource(Protocol):
    """Standardised float32 rows served group by group: the out-of-core form of ``X``.

    ``groups(size)`` makes one pass over the rows in order and yields
    ``(first row, X_g [size, d] on device)`` (the last group may be shorter);
    each tensor is valid until the next one is asked for.
    """

    n: int
    d: int
    device: torch.device

    def groups(self, size: int) -> Iterator[tuple[int, torch.Tensor]]: ...


class Comm(Protocol):
    """Sums and gathers across the processes of a distributed fit (``needleprobe.distributed.FitComm``)."""

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` in place (sum over processes, the same bits on each) and return it."""
        ...

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's ``t`` [m_r, ...] concatenated in rank order (on every process, on t's device)."""
        ...


class _Local:
    """One process: a sum over processes is the value itself, a gather the tensor."""

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        return t


def _two_sum_into(hi, lo, p) -> None:
    """hi + lo += p without losing the rounding error of hi + p (Knuth's TwoSum; numpy arrays or tensors)."""
    s = hi + p
    bp = s - hi
    lo += (hi - (s - bp)) + (p - bp)
    hi[...] = s


class RowData:
    """X plus the per-row constants, with the two matrix products the solver uses.

    ``X`` is a tensor [n, d] or a :class:`RowSource`; with ``comm`` the rows are
    this process's part of the data (every sum over rows goes through
    :meth:`rowsum` / ``comm.sum_``, so ``n`` in the objective is the total).
    """

    def __init__(self, X, y: torch.Tensor, sample_weight: torch.Tensor | None, comm: Comm | None = None):
        self.comm = comm if comm is not None else _Local()
        self.src: RowSource | None = None
        if hasattr(X, "groups"):
            self.src, self.X = X, None
            n, d = int(X.n), int(X.d)
            self.dev = X.device
            self.mm_dtype = torch.float32
        else:
            if not isinstance(X, torch.Tensor):
                X = torch.as_tensor(np.asarray(X))
            if X.ndim != 2:
                raise ValueError(f"X must be 2-D [n, d], got shape {tuple(X.shape)}")
            n, d = X.shape
            if not X.is_floating_point():
                raise ValueError(f"X must be floating point, got {X.dtype}")
            if X.dtype not in (torch.float32, torch.float64):
                X = X.to(torch.float32)
            self.X = (X if X.is_contiguous() else X.contiguous()).detach()
            self.dev = X.device
            self.mm_dtype = self.X.dtype
        n_total = n if comm is None else int(self.comm.sum_(torch.tensor([n], dtype=torch.int64)).item())
        if n_total == 0 or d == 0:
            raise ValueError(f"X must be non-empty, got shape {(n_total, d)}")
        self.n, self.d, self.n_total = n, d, n_total
        y = torch.as_tensor(y).reshape(-1)
        if y.numel() != n:
            raise ValueError(f"y has {y.numel()} entries, X has {n} rows")
        y = y.to(device=self.dev, dtype=_F64)
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("y must contain only 0 and 1")
        if sample_weight is None:
            s = torch.ones(n, dtype=_F64, device=self.dev)
        else:
            s = torch.as_tensor(sample_weight).reshape(-1)
            if s.numel() != n:
                raise ValueError(f"sample_weight has {s.numel()} entries, X has {n} rows")
            s = s.to(device=self.dev, dtype=_F64)
            if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
                raise ValueError("sample_weight must be finite and non-negative")
        c = s / n_total
        self.c = c[:, None]  # [n, 1]: weight of row i in the mean loss
        self.cy = (c * y)[:, None]  # [n, 1]
        self.cny = (c * (1 - y))[:, None]  # [n, 1]
        self.cuda = self.dev.type == "cuda"
        self.group = group_rows(n_total, self.cuda)
        self._views: list[tuple[int, torch.Tensor]] | None = None

    def rowsum(self, M: torch.Tensor) -> torch.Tensor:
        """Sum over rows of M [n, K] (all processes): [K], the same bits however the rows are split over processes.

        Each group of :func:`group_rows` rows is summed alone (processes' rows
        start on group boundaries, so these are the same groups of the same
        rows), the group sums of every process are gathered in rank order, and
        that one [G, K] array is summed: the same operation on the same numbers.
        """
        K = M.shape[1]
        g, n = self.group, M.shape[0]
        full = n // g * g
        parts = [M[:full].reshape(-1, g, K).sum(1)] if full else []
        if full < n:
            parts.append(M[full:].sum(0, keepdim=True))
        sums = torch.cat(parts) if parts else M.new_zeros(0, K)
        return self.comm.cat(sums).sum(0)

    def dd_total(self, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        """A double-double sum (hi + lo) of every process, added in rank order, rounded to float64.

        The rounding errors of the float64 additions are carried in ``lo``, so
        the result is the float64 rounding of the exact sum (up to ~1e-32
        relative): the same bits whether one process added all groups or each
        process its own, except for a sum within that of a rounding midpoint.
        """
        both = self.comm.cat(torch.stack([hi, lo])[None])  # [world, 2, ...]
        H, L = both[0, 0].clone(), both[0, 1].clone()
        for r in range(1, both.shape[0]):
            _two_sum_into(H, L, both[r, 0])
            L += both[r, 1]
        return H + L

    def xp(self, P: torch.Tensor) -> torch.Tensor:
        """X @ P[:-1] + P[-1] for P [d + 1, K] (float64 in and out); row by row, so no sum across processes.

        On CPU each group of :func:`group_rows` rows is one BLAS call of the same
        shape in every layout: a BLAS rounds a row's product differently by the
        call's shape (OpenBLAS's small-matrix GEMM for a 256-row share differed
        from its large-matrix kernel by up to 4e-5 relative), so one call over a
        process's whole share would make z depend on how the rows were split.
        """
        K = P.shape[1]
        Pt = P[:-1].T.to(self.mm_dtype).contiguous()  # [K, d]
        if self.dev.type != "cpu" and self.src is None:
            return (self.X @ Pt.T).to(_F64) + P[-1]
        out = torch.empty(self.n, K, dtype=self.mm_dtype, device=self.dev)
        if self.dev.type != "cpu":
            for a, Xg in self._groups():
                out[a : a + Xg.shape[0]] = Xg @ Pt.T
            return out.to(_F64) + P[-1]
        # One GEMV per column and group, the group read from memory once for all columns: a column's z has the
        # same bits alone or beside others.  np.dot into the output, not `@`: numpy's matmul holds the GIL for
        # part of the call, which slowed the fit command's layer threads down (same BLAS call, same bits).
        Pn, on = Pt.numpy(), np.empty((K, self.n), dtype=Pt.numpy().dtype)
        for a, Xg in self._groups():
            xg = Xg.numpy()
            for k in range(K):
                np.dot(xg, Pn[k], out=on[k, a : a + xg.shape[0]])
        return torch.from_numpy(on).T.to(_F64) + P[-1]

    def _groups(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, X_g) for each group of :func:`group_rows` rows, from the row source or from memory."""
        if self.src is not None:
            yield from self.src.groups(self.group)
            return
        if self._views is None:  # sliced once: a fit makes ~200 passes, and slicing holds the GIL
            self._views = [(a, self.X[a : a + self.group]) for a in range(0, self.n, self.group)]
        yield from self._views

    def xtr(self, R: torch.Tensor) -> torch.Tensor:
        """X^T R for R [n, K] (float64 in and out), all processes: float32 groups, exact float64 sums over groups."""
        return self.dd_total(*self.xtr_parts(R)).T

    def xtr_parts(self, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's X^T R as a double-double (hi, lo) [K, d]: float32 products per group of rows, added in
        float64 with their rounding errors kept."""
        Rt = R.T.to(self.mm_dtype).contiguous()  # [K, n]
        hi = torch.zeros(R.shape[1], self.d, dtype=_F64, device=self.dev)
        lo = torch.zeros_like(hi)
        if self.dev.type != "cpu":
            for a, Xg in self._groups():
                _two_sum_into(hi, lo, (Rt[:, a : a + Xg.shape[0]] @ Xg).to(_F64))
            return hi, lo
        # numpy's BLAS, one GEMV per column (a [1, n] GEMM is slower): its GEMV was ~1.5x faster than torch's
        # MKL on the machine measured.  np.dot(X_g^T, r), not r @ X_g: numpy holds the GIL through the latter
        # (the same BLAS call and bits), which serialised the fit command's layer threads (4.2 s vs 2.3 s for two).
        Rn, hn, ln = Rt.numpy(), hi.numpy(), lo.numpy()
        for a, Xg in self._groups():
            xg = Xg.numpy()
            for k in range(Rn.shape[0]):
                _two_sum_into(hn[k], ln[k], np.dot(xg.T, Rn[k, a : a + xg.shape[0]]).astype(np.float64))
        return hi, lo

    def loss(self, Z: torch.Tensor) -> torch.Tensor:
        """Data term (1/n) sum_i s_i logloss(y_i, z_i) for each column of Z [n, K] (all processes)."""
        # logloss(y, z) = -log sigmoid(z) + (1 - y) z
        return self.rowsum(self.cny * Z - self.c * torch.nn.functional.logsigmoid(Z))

    def residual(self, sig: torch.Tensor) -> torch.Tensor:
        """R = c (sigmoid(z) - y), the derivative of the data term in z."""
        return torch.addcmul(-self.cy, self.c, sig)


def objective(X: torch.Tensor, y: torch.Tensor, weight, bias: float, l2: float,
              sample_weight: torch.Tensor | None = None) -> float:
    """J(w, b) as defined in the module docstring, computed in float64 throughout.

    (A reference for tests and benchmarks: X is converted to float64 chunk by chunk.)
    """
    data = RowData(X, y, sample_weight)
    w = torch.as_tensor(np.asarray(weight), dtype=_F64, device=data.dev).reshape(-1)
    with torch.no_grad():
        Z = torch.empty(data.n, 1, dtype=_F64, device=data.dev)
        for i in range(0, data.n, 8 * _CHUNK_ROWS):
            Z[i : i + 8 * _CHUNK_ROWS, 0] = data.X[i : i + 8 * _CHUNK_ROWS].to(_F64) @ w
        Z += float(bias)
        loss = data.loss(Z)
    return float(loss[0]) + 0.5 * float(l2) * float(w @ w)
