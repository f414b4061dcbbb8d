"""Exact L-BFGS out of core: the memory budget, the choice of solver, and the streamed fit against the in-memory one.

A small synthetic cache (``benchmarks/synthetic_cache.py``, 128-row chunks) and
a budget that holds a quarter of the train rows: the rest are read from the
cache in several blocks at every pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from needleprobe.config import parse_bytes
from needleprobe.errors import NeedleprobeError
from needleprobe.fit.fit import lbfgs_layer
from needleprobe.fit.probe import fit_grid
from needleprobe.io.runtime import fit_settings
from needleprobe.fit.plan import Budget, LayerShape, choose
from needleprobe.fit.streaming import streamed_fit_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synthetic_cache import write_synthetic_cache  # noqa: E402

GRID = [1e-2, 1e-1, 1.0]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NEEDLEPROBE_CHUNK_ROWS", "128")
    try:
        return write_synthetic_cache(tmp_path_factory.mktemp("synth") / "cache", 4000, 1000, 256)
    finally:
        mp.undo()


def test_parse_bytes():
    assert parse_bytes("8MB") == 8_000_000 and parse_bytes("40GB") == 40 * 10**9
    assert parse_bytes("512MiB") == 512 << 20 and parse_bytes("1.5 kb") == 1500 and parse_bytes("100") == 100
    with pytest.raises(ValueError, match="8MB"):
        parse_bytes("lots")


def test_fit_memory_is_validated(tmp_path):
    from needleprobe.config import Config, ProbeConfig, validate

    for bad in ("lots", "0MB"):
        with pytest.raises(NeedleprobeError, match="probe.fit_memory"):
            validate(Config(probe=ProbeConfig(fit_memory=bad)))


def test_auto_never_picks_an_approximate_solver(synthetic):
    shape = LayerShape.of(synthetic, 0)
    roomy = choose("auto", synthetic, 0, CPU, Budget(shape.in_memory_bytes(), "test"))
    assert roomy.solver == "lbfgs" and not roomy.streamed and "in memory" in roomy.why
    for solver in ("auto", "lbfgs"):
        tight = choose(solver, synthetic, 0, CPU, Budget(shape.in_memory_bytes() // 2, "test"))
        assert tight.solver == "lbfgs-out-of-core" and "out of core" in tight.why
        assert tight.plan.held_rows < shape.n_train
    assert choose("minibatch", synthetic, 0, CPU, Budget(10**12, "test")).solver == "minibatch"
    with pytest.raises(NeedleprobeError, match="raise --fit-memory") as e:
        choose("auto", synthetic, 0, CPU, Budget(100_000, "test"))
    assert "\n" not in str(e.value)


def test_out_of_core_equals_in_memory(synthetic):
    """Several blocks per pass: every grid value's val AUROC, the selected L2 and the weights are the in-memory ones."""
    shape = LayerShape.of(synthetic, 0)
    budget = Budget(7_000_000, "test")
    assert shape.in_memory_bytes() > 2 * budget.bytes
    choice = choose("auto", synthetic, 0, CPU, budget)
    assert choice.solver == "lbfgs-out-of-core"
    assert (shape.n_train - choice.plan.held_rows) >= 4 * choice.plan.block_rows  # several blocks read per pass
    with fit_settings():
        want = fit_grid(lbfgs_layer(synthetic, 0, GRID, CPU), GRID, "weighted", 1)
        data = streamed_fit_data(synthetic, 0, GRID, CPU, choice)
        got = fit_grid(data, GRID, "weighted", 1)
    assert got["selected_l2"] == want["selected_l2"]
    for g, w in zip(got["l2_results"], want["l2_results"]):
        assert abs(g["val_auroc"] - w["val_auroc"]) <= 1e-6
        assert abs(g["train_auroc"] - w["train_auroc"]) <= 1e-6
        assert g["n_iter"] == w["n_iter"]
    rel = np.abs(got["weight"] - want["weight"]).max() / np.abs(want["weight"]).max()
    assert rel <= 1e-5
    io = data.io
    assert io.passes > 10 and io.bytes_read >= io.passes * io.pass_bytes
    assert io.pass_bytes > 0
    assert io.peak_rows_held < shape.n_train  # never the whole layer at once


def test_layer_rows_serve_rows_and_subsets_in_order(synthetic):
    """Held rows first, then blocks read ahead on a thread: every pass is the rows (or the row subset), standardised."""
    from needleprobe.fit.streaming import IOStats, LayerRows

    train = synthetic.split("train")
    x = train.to_numpy(0)
    mean, std = x.mean(0).astype(np.float32), (x.std(0) + 1).astype(np.float32)
    idx = np.sort(np.random.default_rng(0).choice(x.shape[0], 1500, replace=False))
    for index, want in ((None, x[100:3000]), (idx, x[idx])):
        stats = IOStats()
        rows = LayerRows(train, 0, 100 if index is None else 0, 3000 if index is None else x.shape[0], index=index,
                         mean32=mean, std32=std, block_rows=256, piece_rows=256, held_rows=512, stats=stats)
        for _ in range(2):
            got = np.concatenate([g.numpy().copy() for _, g in rows.groups(128)])
            np.testing.assert_array_equal(got, (want - mean) / std)
        assert stats.passes == 2 and stats.peak_rows_held == 512 + 2 * 256
        rows.close()
        assert stats.rows_held == 0


@pytest.mark.parametrize("block", [64, 192])
def test_each_chunk_is_fetched_once_per_pass(synthetic, block):
    """Blocks smaller than a chunk (64 rows of 128) or ending inside one (192): a pass fetches each chunk of the
    streamed rows once, not once per block that touches it (what an object store bills); the rows are the same."""
    from needleprobe.fit.streaming import IOStats, LayerRows

    train = synthetic.split("train")
    x, arr = train.to_numpy(0), train.activations(0)
    c = arr.chunks[0]
    idx = np.sort(np.random.default_rng(1).choice(x.shape[0], 1500, replace=False))
    for start, stop, index in ((100, 3000, None), (0, x.shape[0], idx)):
        stats = IOStats()
        rows = LayerRows(train, 0, start, stop, index=index, block_rows=block, piece_rows=c, held_rows=2 * block,
                         stats=stats)
        raw = np.arange(start, stop) if index is None else index
        streamed = raw[2 * block :]
        once = sum(arr.stored_bytes(k * c, k * c + 1) for k in np.unique(streamed // c))
        per_block = sum(arr.stored_bytes(int(b[0]), int(b[-1]) + 1) for b in np.array_split(
            streamed, range(block, len(streamed), block)))
        assert rows.pass_bytes == once < per_block
        for _ in range(2):
            before = stats.bytes_read
            got = np.concatenate([b.copy() for _, b in rows.blocks()])
            np.testing.assert_array_equal(got, x[raw])
            assert stats.bytes_read - before == once
        rows.close()


class _ThreadComm:
    """``solvers.Comm`` between threads of one process: what ``distributed.FitComm`` does between processes."""

    def __init__(self, rank: int, world: int, board: list, barrier):
        self.rank, self.world, self.board, self.barrier = rank, world, board, barrier

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        self.barrier.wait()
        self.board[self.rank] = t.clone()
        self.barrier.wait()
        out = torch.cat([self.board[r] for r in range(self.world)])
        self.barrier.wait()
        return out

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        t.copy_(self.cat(t[None]).sum(0))
        return t

    @property
    def dist(self):  # what ``plan.choose`` reads of ``FitComm.dist``
        return self

    def any(self, flag: bool) -> bool:
        return bool(self.cat(torch.tensor([int(flag)])).sum())


def test_a_share_too_big_for_the_budget_stops_every_process_with_a_message(synthetic, monkeypatch):
    """Under torchrun, when one process's share does not fit --fit-memory, every process stops with a one-line
    error (that one says what it needs, the others point to it) instead of the others waiting on its sums."""
    import threading

    import needleprobe.fit.plan as fit_plan

    real = fit_plan.stream_plan

    def plan(*args, **kwargs):  # rank 1's share is refused, as a larger share under a tight budget would be
        if threading.current_thread().name == "rank-1":
            raise NeedleprobeError("a fit memory of 1 B cannot hold even two blocks of 64 rows: it needs at least 2 MiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_plan, "stream_plan", plan)
    board, barrier, errors = [None, None], threading.Barrier(2, timeout=60), {}

    def rank(r: int) -> None:
        try:
            choose("auto", synthetic, 0, CPU, Budget(10**9, "test"), comm=_ThreadComm(r, 2, board, barrier))
        except NeedleprobeError as e:
            errors[r] = str(e)

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank-{r}") for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors[1] == "rank 1: a fit memory of 1 B cannot hold even two blocks of 64 rows: it needs at least 2 MiB"
    assert errors[0].startswith("rank 0: another process's share of the train rows does not fit the budget")
    assert "\n" not in errors[0] and "--fit-memory" in errors[0]


def test_split_rows_give_the_one_process_bits():
    """Rows split over 2 or 3 'processes' (threads with a gather), shares on group boundaries: the same weights,
    losses and iterations as one process, bit for bit."""
    import threading

    from needleprobe.fit.lbfgs import fit_l2_path, group_rows

    rng = np.random.default_rng(0)
    n, d = 3000, 40
    x = (rng.standard_normal((n, d)) * np.r_[np.full(3, 30.0), np.ones(d - 3)]).astype(np.float32)
    y = (x[:, 3] + x[:, 4] + rng.standard_normal(n) > 1.5).astype(np.float32)
    grid = [1e-4, 1e-2, 1.0]
    with fit_settings():
        want = fit_l2_path(torch.from_numpy(x), torch.from_numpy(y), grid)
        g = group_rows(n)
        for cuts in ([0, 7 * g, n], [0, 2 * g, 10 * g, n]):
            world = len(cuts) - 1
            board, barrier, got = [None] * world, threading.Barrier(world), [None] * world

            def work(r):
                a, b = cuts[r], cuts[r + 1]
                got[r] = fit_l2_path(torch.from_numpy(x[a:b]), torch.from_numpy(y[a:b]), grid,
                                     comm=_ThreadComm(r, world, board, barrier))

            threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for r in range(world):
                for a, b in zip(got[r], want):
                    assert np.array_equal(a.weight, b.weight) and a.bias == b.bias
                    assert a.loss == b.loss and a.n_iter == b.n_iter


@pytest.mark.parametrize("feature_dtype", ["bfloat16", "float32"])
def test_conversion_into_a_buffer_equals_the_allocating_one(feature_dtype):
    """Streamed blocks are widened into reused buffers: the same float32 values as ``to_float32`` returns."""
    from needleprobe.cache.format import to_float32

    x = torch.randn(7, 5)
    raw = (x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16) if feature_dtype == "bfloat16"
           else x.numpy())
    out = np.full((7, 5), np.nan, np.float32)
    assert to_float32(raw, feature_dtype, out=out) is out
    np.testing.assert_array_equal(out, to_float32(raw, feature_dtype))
    if feature_dtype == "bfloat16":
        np.testing.assert_array_equal(out, x.to(torch.bfloat16).float().numpy())
