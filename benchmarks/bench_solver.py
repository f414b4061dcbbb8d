"""Benchmark: ``fit_l2_path`` over an L2 grid vs a per-value scikit-learn lbfgs loop.

Synthetic activations that look like an LM residual stream: correlated features
with a decaying spectrum, a handful of outlier dimensions with ~100x scale and
an offset, a planted linear signal and ~10% positives.  Features are
standardised with train statistics, both solvers see the same float32 arrays
and the same class-balanced sample weights ``s_i = n / (2 n_{y_i})``, and for
every grid value scikit-learn gets ``C = 1 / (l2 * n)`` (the same objective; see
``needleprobe.fit.lbfgs``).

The reference is scikit-learn at ``--sk-tol`` (default 1e-6).  Because
``sum(s) == n``, scikit-learn's lbfgs minimises exactly our J and its ``tol`` is
the same max-abs-gradient test as ours, so equal tolerances mean equal stopping
rules.  scikit-learn at its default ``tol=1e-4`` is timed too, for reference.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_solver.py --n 100000 --d 2048 \\
        --grid 1e-4,1e-3,1e-2,1e-1,1 [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from needleprobe.fit.lbfgs import fit_l2_path, objective  # noqa: E402


def make_data(n: int, n_val: int, d: int, seed: int, n_outliers: int = 4, pos_frac: float = 0.1):
    """Standardised float32 train/val features and {0, 1} labels (see module docstring)."""
    rng = np.random.default_rng(seed)
    N = n + n_val
    r = max(16, d // 4)
    # Latent factors with a power-law spectrum plus isotropic noise: ill-conditioned.
    B = rng.standard_normal((r, d), dtype=np.float32)
    B *= (np.arange(1, r + 1, dtype=np.float32) ** -1.0)[:, None] * (10.0 / np.sqrt(d))
    X = np.empty((N, d), dtype=np.float32)
    step = 16384
    for i in range(0, N, step):
        m = min(step, N - i)
        X[i : i + m] = rng.standard_normal((m, r), dtype=np.float32) @ B
        X[i : i + m] += 0.05 * rng.standard_normal((m, d), dtype=np.float32)
    out = rng.choice(d, n_outliers, replace=False)
    X[:, out] = X[:, out] * 100.0 + 30.0  # massive-activation dimensions
    w_true = rng.standard_normal(d).astype(np.float32)
    mu = X[:n].mean(0, dtype=np.float64).astype(np.float32)
    sd = X[:n].std(0, dtype=np.float64).astype(np.float32)
    X -= mu
    X /= sd
    logit = X @ w_true
    logit *= 3.0 / logit[:n].std()
    logit -= np.quantile(logit[:n], 1.0 - pos_frac)
    y = (rng.random(N) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return X[:n], y[:n], X[n:], y[n:]


def balanced_weights(y: np.ndarray) -> np.ndarray:
    n = len(y)
    n1 = float(y.sum())
    return np.where(y == 1, n / (2 * n1), n / (2 * (n - n1))).astype(np.float32)


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score))


def sklearn_path(X, y, s, grid, tol, max_iter):
    n = X.shape[0]
    res = []
    for l2 in grid:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            m = LogisticRegression(C=1.0 / (l2 * n), tol=tol, max_iter=max_iter, solver="lbfgs")
            m.fit(X, y, sample_weight=s)
        dt = time.perf_counter() - t0
        warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
        res.append(dict(l2=l2, w=m.coef_[0].astype(np.float64), b=float(m.intercept_[0]),
                        n_iter=int(m.n_iter_[0]), time=dt, warned=warned))
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="training rows")
    ap.add_argument("--d", type=int, default=2048, help="features")
    ap.add_argument("--n-val", type=int, default=None, help="validation rows (default n/5)")
    ap.add_argument("--grid", default="1e-4,1e-3,1e-2,1e-1,1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-6, help="fit_l2_path tolerance")
    ap.add_argument("--sk-tol", type=float, default=1e-6, help="scikit-learn reference tol")
    ap.add_argument("--sk-max-iter", type=int, default=10_000)
    ap.add_argument("--no-sk-default", action="store_true",
                    help="skip the scikit-learn run at its default tol=1e-4")
    ap.add_argument("--ours-only", action="store_true", help="time fit_l2_path only")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for torch and for scikit-learn's BLAS (default: torch's)")
    args = ap.parse_args(argv)

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    grid = [float(v) for v in args.grid.split(",")]
    n_val = args.n_val or max(1000, args.n // 5)

    t0 = time.perf_counter()
    X, y, Xv, yv = make_data(args.n, n_val, args.d, args.seed)
    s = balanced_weights(y)
    print(f"# data: n={args.n} d={args.d} val={n_val} pos={y.mean():.3f} "
          f"({time.perf_counter() - t0:.1f}s to generate); threads={threads}; "
          f"grid={grid}", flush=True)

    Xt, yt, st = torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(s)
    # (sklearn and scipy are imported at module level so that the limit reaches their
    # BLAS and OpenMP runtimes too.)
    with threadpool_limits(threads):
        libs = sorted({(i["internal_api"], i["num_threads"]) for i in threadpool_info()})
        print(f"# thread pools: {libs}", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        ours = fit_l2_path(Xt, yt, grid, st, tol=args.tol)
        t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0
        print(f"# fit_l2_path: {t_ours:.2f}s wall, {c_ours:.2f}s cpu; iterations "
              f"{[r.n_iter for r in ours]}; converged {[r.converged for r in ours]}", flush=True)
        if args.ours_only:
            return

        t0, c0 = time.perf_counter(), time.process_time()
        sk = sklearn_path(X, y, s, grid, args.sk_tol, args.sk_max_iter)
        t_sk, c_sk = time.perf_counter() - t0, time.process_time() - c0
        print(f"# sklearn tol={args.sk_tol:g}: {t_sk:.2f}s wall, {c_sk:.2f}s cpu", flush=True)

        sk_def = None
        if not args.no_sk_default:
            t0, c0 = time.perf_counter(), time.process_time()
            sk_def = sklearn_path(X, y, s, grid, 1e-4, args.sk_max_iter)
            t_def, c_def = time.perf_counter() - t0, time.process_time() - c0
            print(f"# sklearn default tol=1e-4: {t_def:.2f}s wall, {c_def:.2f}s cpu", flush=True)

    rows = []
    for r, a in zip(ours, sk):
        J_ours = objective(Xt, yt, r.weight, r.bias, r.l2, st)
        J_sk = objective(Xt, yt, a["w"], a["b"], r.l2, st)
        row = dict(l2=r.l2, it=r.n_iter, conv=r.converged, g=r.grad_norm,
                   auc=auroc(yv, Xv @ r.weight + r.bias),
                   sk_it=a["n_iter"], sk_time=a["time"], sk_warn=a["warned"],
                   sk_auc=auroc(yv, Xv @ a["w"].astype(np.float32) + a["b"]),
                   gap=(J_ours - J_sk) / abs(J_sk))
        rows.append(row)
    if sk_def is not None:
        for row, a in zip(rows, sk_def):
            row["def_it"] = a["n_iter"]
            row["def_auc"] = auroc(yv, Xv @ a["w"].astype(np.float32) + a["b"])

    print()
    print(f"n={args.n} d={args.d}, {threads} thread(s); ours tol={args.tol:g}, "
          f"sklearn lbfgs tol={args.sk_tol:g}")
    print()
    hdr = ("| l2 | ours iters | ours conv | sklearn iters | sklearn s | AUROC ours | AUROC sklearn "
           "| dAUROC | (J_ours-J_sk)/J_sk |")
    if sk_def is not None:
        hdr += " sklearn@1e-4 iters | dAUROC@1e-4 |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        warn = "*" if r["sk_warn"] else ""
        line = (f"| {r['l2']:g} | {r['it']} | {r['conv']} | {r['sk_it']}{warn}"
                f" | {r['sk_time']:.1f} | {r['auc']:.5f} | {r['sk_auc']:.5f} "
                f"| {r['auc'] - r['sk_auc']:+.1e} | {r['gap']:+.1e} |")
        if sk_def is not None:
            line += f" {r['def_it']} | {r['def_auc'] - r['sk_auc']:+.1e} |"
        print(line)
    best_ours = max(rows, key=lambda r: r["auc"])["l2"]
    best_sk = max(rows, key=lambda r: r["sk_auc"])["l2"]
    max_d = max(abs(r["auc"] - r["sk_auc"]) for r in rows)
    print()
    print("| solver | wall s | cpu s | speed-up (wall) | max abs dAUROC vs sklearn tight "
          "| best l2 |")
    print("|---|---|---|---|---|---|")
    print(f"| fit_l2_path (tol={args.tol:g}) | {t_ours:.2f} | {c_ours:.2f} | "
          f"{t_sk / t_ours:.2f}x | {max_d:.1e} | {best_ours:g} |")
    print(f"| sklearn lbfgs loop (tol={args.sk_tol:g}) | {t_sk:.2f} | {c_sk:.2f} | 1.00x | 0 | "
          f"{best_sk:g} |")
    if sk_def is not None:
        max_def = max(abs(r["def_auc"] - r["sk_auc"]) for r in rows)
        best_def = max(rows, key=lambda r: r["def_auc"])["l2"]
        print(f"| sklearn lbfgs loop (default tol=1e-4) | {t_def:.2f} | {c_def:.2f} | "
              f"{t_sk / t_def:.2f}x | {max_def:.1e} | {best_def:g} |")
    print()
    print("(* = scikit-learn raised ConvergenceWarning for that value)")


if __name__ == "__main__":
    main()
