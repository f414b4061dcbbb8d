"""A probe as an object: fitted over an L2 grid, scored, saved and loaded.

:class:`LinearProbe` follows scikit-learn's estimator protocol: hyper-parameters
in ``__init__``, learned state with a trailing underscore (``coef_`` for raw
activations, ``intercept_``), ``decision_function`` / ``predict_proba``, and a
symmetric ``save`` / ``load`` whose files are the ones ``needleprobe fit``
writes (``probe_layer_{L}_seed_{S}.pt`` and ``.json``).  ``fit`` on a cache and
:meth:`LinearProbe.fit_path` on arrays run the same code (:func:`fit_grid`).

The objective (see :mod:`needleprobe.fit.lbfgs`)::

    J(w, b) = (1/n) Σ_i s_i · logloss(y_i, x_i·w + b) + (l2 / 2) · ||w||²

on standardised features, bias unpenalised; ``class_balance: weighted`` sets
s_i = n / (2 n_{y_i}), ``downsample`` keeps all positives and as many negatives
drawn with the seed (s_i = 1).  The grid value with the best validation AUROC
wins; ties go to the stronger L2.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..config import DEFAULT_L2_GRID
from ..errors import NeedleprobeError
from ..metrics import binary_metrics, bootstrap_auroc_ci
from ..io.stores import as_path, is_url

NOISE_FLOOR = 1e-5
"""A feature whose standard deviation is below this fraction of the activations' RMS is treated as constant.

Rounding differences between thread counts or kernels move activations by
about 1e-6 of their RMS; a feature that varies less than that is rounding
noise, and standardising it would turn noise into a unit-variance input that
weak L2 values fit (measured on MiniLM's last layer: three such dimensions made
val AUROC move by 1.6e-4 under 1e-7 relative noise; with this floor, 6e-7).
"""


def column_moments(x: np.ndarray, block_rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation [d] (float64) of rows x [n, d].

    The same numbers as ``x.mean(0, dtype=float64)`` and ``x.std(0, dtype=float64)``
    (two passes, rows summed in order), but through a small float64 block
    instead of an n × d float64 temporary: 2-10x faster on a fresh matrix.
    """
    return column_moments_of_blocks(lambda: (x,), x.shape[0], x.shape[1], block_rows)


def column_moments_of_blocks(blocks: Callable[[], Iterable[np.ndarray]], n: int, d: int, block_rows: int = 1024,
                             allsum: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`column_moments` of rows served as consecutive blocks (``blocks()`` starts a pass, in row order).

    Rows are summed one after another whatever the blocks, so one process streaming
    its rows gets :func:`column_moments`' numbers bit for bit.  Across processes
    (``allsum``: the sum over processes, ``n`` the total) each sums its rows and
    the sums are added: the same formula, equal up to float64 association.
    """
    buf = np.empty((block_rows + 1, d))  # row 0 carries the running sum, so rows add in order
    sums = []
    mean = None
    for _ in range(2):
        total = np.zeros(d)
        for x in blocks():
            for a in range(0, x.shape[0], block_rows):
                b = min(x.shape[0], a + block_rows)
                buf[0] = total
                if mean is None:
                    buf[1 : b - a + 1] = x[a:b]
                else:
                    dev = buf[1 : b - a + 1]
                    np.subtract(x[a:b], mean, out=dev)
                    np.multiply(dev, dev, out=dev)
                np.add.reduce(buf[: b - a + 1], axis=0, out=total)
        if allsum is not None:
            total = allsum(total)
        sums.append(total)
        if mean is None:
            mean = total / n
    return mean, np.sqrt(sums[1] / n)


def feature_scale(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Standard deviations [d] to divide by: 1 for features that are constant up to rounding noise."""
    scale = float(np.sqrt(np.mean(std**2) + np.mean(mean**2)))
    out = std.copy()
    out[out <= NOISE_FLOOR * scale] = 1.0
    return out


def training_rows(y: np.ndarray, class_balance: str, seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(row subset or None for all, sample weights or None) for one seed."""
    n = y.size
    n_pos = int(y.sum())
    if class_balance == "weighted":
        w = np.where(y == 1, n / (2.0 * n_pos), n / (2.0 * (n - n_pos))).astype(np.float32)
        return None, w
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([pos, rng.choice(neg, size=min(len(pos), len(neg)), replace=False)]))
    return keep, None


def to_raw(w_std: np.ndarray, b_std: float, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights on standardised features → weights on raw activations (float32 [d], float)."""
    w = w_std.astype(np.float64) / std
    return w.astype(np.float32), float(b_std - np.dot(w, mean))


@dataclass
class FitData:
    """One layer's fitting context: labels, standardisation, and how to fit and score.

    The in-memory form (:meth:`from_arrays`) holds the standardised train matrix
    (shared by every seed and L2 value) and the raw val matrix; ``fit`` also
    builds forms that read both from the cache in blocks (:mod:`needleprobe.fit.streaming`:
    out of core, and split over ``torchrun`` processes) and the ``minibatch`` one.
    """

    y_train: np.ndarray  # int8 [n_train]
    y_val: np.ndarray  # int8 [n_val]
    val_groups: np.ndarray  # [n_val], document of each row (for the bootstrap CI)
    mean: np.ndarray  # float64 [d]
    std: np.ndarray  # float64 [d], already floored (feature_scale)
    fit_path: Callable[[np.ndarray | None, np.ndarray | None, int], list]
    """(row subset or None, sample weights or None, seed) → one ``solvers.PathResult`` per grid value"""
    val_scores: Callable[[np.ndarray, np.ndarray], np.ndarray]
    """(raw weights [d, K], raw biases [K]) → val logits [n_val, K]"""
    solver: str = "lbfgs"
    train_scores: Callable[[np.ndarray | None, np.ndarray, np.ndarray], np.ndarray] | None = None
    """(row subset or None, standardised weights [d, K], biases [K]) → logits [n_used, K] of the train rows the fit used"""
    io: Any = None
    """Streamed forms: their ``streaming.IOStats`` (passes over the train rows, bytes read); None in memory."""

    @classmethod
    def from_arrays(cls, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, val_groups: np.ndarray,
                    grid: Sequence[float], device: Any = "cpu", *, copy: bool = True) -> "FitData":
        """From train rows x [n, d] and val rows x_val [m, d] (float32, raw activations).

        ``copy=False`` standardises ``x`` in place (``fit`` owns the array it read; a user's array is copied).
        """
        import torch

        from .lbfgs import fit_l2_path

        x = np.array(x, dtype=np.float32, copy=True) if copy else np.asarray(x, dtype=np.float32)
        mean, std = column_moments(x)
        std = feature_scale(mean, std)
        x -= mean.astype(np.float32)
        x /= std.astype(np.float32)
        dev = torch.device(device)
        x_t = torch.from_numpy(x).to(dev)
        y = np.asarray(y)
        x_val = np.asarray(x_val, dtype=np.float32)

        def fit_path(rows, weights, seed):
            xs = x_t if rows is None else x_t[torch.from_numpy(rows).to(dev)]
            ys = torch.from_numpy((y if rows is None else y[rows]).astype(np.float32)).to(dev)
            sw = None if weights is None else torch.from_numpy(weights).to(dev)
            return fit_l2_path(xs, ys, list(grid), sample_weight=sw)

        def train_scores(rows, w, b):
            if dev.type == "cpu":  # numpy's BLAS: a row's score does not depend on the rows beside it (streamed forms)
                return (x if rows is None else x[rows]) @ w + b
            xs = x_t if rows is None else x_t[torch.from_numpy(rows).to(dev)]
            return (xs @ torch.from_numpy(w).to(dev) + torch.from_numpy(b).to(dev)).cpu().numpy()

        return cls(y, np.asarray(y_val), np.asarray(val_groups), mean, std, fit_path, lambda w, b: x_val @ w + b,
                   train_scores=train_scores)


def fit_grid(data: FitData, grid: Sequence[float], class_balance: str, seed: int) -> dict[str, Any]:
    """Fit every grid value, score train and val, select the best: the numbers a probe's ``.json`` reports.

    Train metrics are on the rows the fit used (the downsampled subset, or every
    row; unweighted, which for AUROC equals the balanced-weight AUROC), so a
    train AUROC far above val says the probe memorised its rows.  Besides the
    JSON's numbers the dict holds ``val_scores`` [n_val] of the selected L2 and
    ``train_scores`` [n_used, K], ``train_labels`` [n_used] (never written).
    """
    rows, weights = training_rows(data.y_train, class_balance, seed)
    path = data.fit_path(rows, weights, seed)
    raw = [to_raw(r.weight, r.bias, data.mean, data.std) for r in path]
    scores = data.val_scores(np.stack([w for w, _ in raw], 1), np.array([b for _, b in raw], np.float32))
    y_used = data.y_train if rows is None else data.y_train[rows]
    train_scores = None
    if data.train_scores is not None:
        w_std = np.stack([np.asarray(r.weight, np.float32) for r in path], 1)
        train_scores = data.train_scores(rows, w_std, np.array([r.bias for r in path], np.float32))
    l2_results, train_metrics = [], []
    for k, r in enumerate(path):
        m = binary_metrics(data.y_val, scores[:, k])
        mt = binary_metrics(y_used, train_scores[:, k]) if train_scores is not None else None
        train_metrics.append(mt)
        l2_results.append(
            {
                "l2": float(r.l2),
                "val_auroc": m["auroc"],
                "val_average_precision": m["average_precision"],
                "train_auroc": None if mt is None else mt["auroc"],
                "train_average_precision": None if mt is None else mt["average_precision"],
                "train_objective": float(r.loss),
                "grad_max_abs": float(r.grad_norm),
                "n_iter": int(r.n_iter),
                "converged": bool(r.converged),
            }
        )
    best = max(range(len(grid)), key=lambda i: (l2_results[i]["val_auroc"], grid[i]))  # ties → stronger L2
    w, b = raw[best]
    s = scores[:, best]
    metrics = binary_metrics(data.y_val, s)
    metrics["auroc_ci95"] = list(bootstrap_auroc_ci(data.y_val, s, data.val_groups, n_boot=1000, seed=0))
    return {
        "selected_l2": float(grid[best]),
        "weight": w,
        "bias": b,
        "l2_results": l2_results,
        "val_metrics": metrics,
        "train_metrics": train_metrics[best],
        "train_rows_used": int(y_used.size),
        "val_scores": s,
        "train_scores": train_scores,
        "train_labels": y_used,
    }


class LinearProbe:
    """A logistic-regression probe on raw activations: logit = x · coef_ + intercept_.

    >>> probe = LinearProbe.fit_path(X, y, X_val, y_val, l2_grid=[0.01, 0.1, 1])
    >>> probe.decision_function(X_test)      # float32 [n] logits
    >>> probe.save("results/probes/mine/probe_layer_3_seed_0")
    >>> LinearProbe.load("results/probes/mine/probe_layer_3_seed_0.pt")
    """

    def __init__(self, l2_grid: Sequence[float] = DEFAULT_L2_GRID, class_balance: str = "weighted",
                 seed: int = 0, device: str = "cpu"):
        if class_balance not in ("weighted", "downsample"):
            raise ValueError(f"class_balance must be 'weighted' or 'downsample', got {class_balance!r}")
        self.l2_grid = [float(v) for v in l2_grid]
        self.class_balance = class_balance
        self.seed = seed
        self.device = device
        self.metadata_: dict[str, Any] = {}

    # -- fitting -------------------------------------------------------------------
    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
            val_groups: np.ndarray | None = None) -> "LinearProbe":
        """Fit every L2 value on (X, y) and keep the one with the best AUROC on (X_val, y_val).

        ``val_groups`` (the document of each val row) makes the AUROC's 95% CI a
        document bootstrap; without it every row is its own group.
        """
        X, X_val = np.asarray(X), np.asarray(X_val)
        if X.ndim != 2 or X_val.ndim != 2 or X.shape[1] != X_val.shape[1]:
            raise ValueError(f"X [n, d] and X_val [m, d] must share d, got {X.shape} and {X_val.shape}")
        groups = np.arange(len(y_val)) if val_groups is None else np.asarray(val_groups)
        # no process-wide setting here (threads, matmul precision): a library call leaves the caller's as they are;
        # the fit command sets its own once around all of its fits (``io.runtime.fit_settings``)
        data = FitData.from_arrays(X, y, X_val, y_val, groups, self.l2_grid, self.device)
        fitted = fit_grid(data, self.l2_grid, self.class_balance, self.seed)
        self._set(fitted["weight"], fitted["bias"])
        self.metadata_ = {
            "selected_l2": fitted["selected_l2"],
            "l2_results": fitted["l2_results"],
            "val_metrics": fitted["val_metrics"],
            "train_metrics": fitted["train_metrics"],
            "class_balance": self.class_balance,
            "solver": "lbfgs",
            "train_stats": {"rows": int(len(y)), "positives": int(np.sum(y)), "rows_used": fitted["train_rows_used"]},
            "probe_applies_to": "raw activations: logit = x @ weight + bias",
        }
        return self

    @classmethod
    def fit_path(cls, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, l2_grid: Sequence[float],
                 # 9 parameters: public API, data as scikit-learn's fit takes it, the rest keyword-only config keys
                 *, class_balance: str = "weighted", seed: int = 0, val_groups: np.ndarray | None = None,
                 device: str = "cpu") -> "LinearProbe":
        """A probe fitted over ``l2_grid`` with validation selection: exactly what ``needleprobe fit`` does per layer."""
        return cls(l2_grid, class_balance, seed, device).fit(X, y, X_val, y_val, val_groups)

    @classmethod
    def from_weights(cls, weight: np.ndarray, bias: float, metadata: dict[str, Any] | None = None) -> "LinearProbe":
        probe = cls()
        probe._set(np.asarray(weight, dtype=np.float32), float(bias))
        probe.metadata_ = dict(metadata or {})
        return probe

    def _set(self, weight: np.ndarray, bias: float) -> None:
        self.coef_ = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1)
        self.intercept_ = float(np.float32(bias))

    # -- what it learned --------------------------------------------------------------
    @property
    def d_model(self) -> int:
        return int(self.coef_.shape[0])

    @property
    def selected_l2_(self) -> float | None:
        return self.metadata_.get("selected_l2")

    @property
    def val_auroc_(self) -> float | None:
        return self.metadata_.get("val_metrics", {}).get("auroc")

    @property
    def layer(self) -> int | None:
        return self.metadata_.get("layer")

    @property
    def identity(self):
        """(dataset, model, site) the probe was fitted on, from its metadata (None for a probe fitted on arrays)."""
        from ..run.layout import RunIdentity

        return RunIdentity.from_config_dict(self.metadata_.get("config", {}))

    # -- scoring ----------------------------------------------------------------------
    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits [n] (float32) for raw activation rows X [n, d_model]: X · coef_ + intercept_, as ``fit`` scores."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.d_model:
            raise NeedleprobeError(
                f"the probe reads d_model {self.d_model}, the activations have shape {tuple(X.shape)} "
                "(a probe of another model or site?)"
            )
        return (X.astype(np.float32, copy=False) @ self.coef_[:, None] + np.float32(self.intercept_))[:, 0]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """[n, 2] probabilities of (not needle, needle), scikit-learn's layout."""
        p = 1.0 / (1.0 + np.exp(-self.decision_function(X).astype(np.float64)))
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """1 where the logit is positive (probability above 0.5), else 0."""
        return (self.decision_function(X) > 0).astype(np.int8)

    # -- files ------------------------------------------------------------------------
    def save(self, stem: str | Path) -> tuple[Path, Path]:
        """Write ``{stem}.pt`` (``{"weight": float32 [d], "bias": float32 []}``) and ``{stem}.json`` (the metadata)."""
        import torch

        from ..io.files import atomic_write_bytes, atomic_write_json

        stem = as_path(stem)
        pt, js = stem.with_name(stem.name + ".pt"), stem.with_name(stem.name + ".json")
        buf = io.BytesIO()
        torch.save({"weight": torch.from_numpy(self.coef_.copy()), "bias": torch.tensor(self.intercept_, dtype=torch.float32)}, buf)
        atomic_write_bytes(pt, buf.getvalue())
        atomic_write_json(js, self.metadata_)
        return pt, js

    @classmethod
    def load(cls, path: str | Path) -> "LinearProbe":
        """From a ``.pt`` file (or its ``.json``, or the common stem); the ``.json`` beside it gives the metadata."""
        import torch

        p = as_path(path)
        stem = p.with_suffix("") if p.suffix in (".pt", ".json") else p
        pt, js = stem.with_name(stem.name + ".pt"), stem.with_name(stem.name + ".json")
        if not pt.is_file():
            raise NeedleprobeError(f"{pt}: probe file not found")
        try:
            d = torch.load(io.BytesIO(pt.read_bytes()) if is_url(pt) else pt, weights_only=True)
            weight, bias = d["weight"], d["bias"]
        except Exception as e:  # a truncated or foreign file
            raise NeedleprobeError(f"{pt}: not a probe file ({type(e).__name__}: {str(e)[:120]})") from None
        meta: dict[str, Any] = {}
        if js.is_file():
            try:
                meta = json.loads(js.read_text())
            except ValueError as e:
                raise NeedleprobeError(f"{js}: not valid JSON ({e})") from None
        return cls.from_weights(weight.numpy(), float(bias), meta)

    def __repr__(self) -> str:
        where = f"layer={self.layer}, " if self.layer is not None else ""
        fitted = f", selected_l2={self.selected_l2_:g}" if self.selected_l2_ is not None else ""
        return f"LinearProbe({where}d_model={getattr(self, 'coef_', np.zeros(0)).shape[0]}{fitted})"
