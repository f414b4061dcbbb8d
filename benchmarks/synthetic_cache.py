"""A synthetic activation cache of any size, written without a model (benchmarks and the out-of-core tests).

``write_synthetic_cache(path, n_train, n_val, d)`` writes a cache that
``needleprobe.open_cache`` reads like any other (format 2: crc32c chunks,
labels, doc index): rows drawn from a few latent factors plus noise, with a few
dimensions ~100× larger than the rest (as in a real residual stream), labels
from a logistic model on them (~10% positives), documents of ~57 rows (needle
rows plus 32 sampled negatives per document, as ``extract`` stores).  Rows are
generated and written block by block, so a cache larger than memory is fine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROWS_PER_DOC = 57


def _rows(rng: np.random.Generator, n: int, d: int, basis: np.ndarray, w: np.ndarray, outliers: np.ndarray):
    z = rng.standard_normal((n, basis.shape[0])).astype(np.float32)
    x = z @ basis + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    x[:, outliers] = x[:, outliers] * 100 + 20
    logit = 2.5 * (z @ w) / float(np.linalg.norm(w)) - 3.0
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    return x.astype(np.float32), y


def write_synthetic_cache(path: str | Path, n_train: int, n_val: int, d: int, *, layers: tuple[int, ...] = (0,),
                          feature_dtype: str = "float32", seed: int = 0, block_rows: int = 65536):
    """Write the cache at ``path`` (a directory or fsspec URL) and return it opened (``needleprobe.Cache``)."""
    from needleprobe.cache.format import STORAGE_DTYPES
    from needleprobe.cache.reader import open_cache
    from needleprobe.cache.writer import CacheWriter, SplitPlan

    rng = np.random.default_rng(seed)
    r = 16
    basis = (rng.standard_normal((r, d)) * (np.arange(1, r + 1) ** -0.5)[:, None]).astype(np.float32)
    w = rng.standard_normal(r).astype(np.float32)
    outliers = rng.choice(d, size=min(4, d), replace=False)
    fields = {"cache_format": 2, "dataset": f"synthetic_{n_train}x{d}", "layers": sorted(layers),
              "feature_dtype": feature_dtype, "model_name": "synthetic", "seed": seed}
    writer = CacheWriter(path, fields, {"d_model": d, "layers": sorted(layers), "feature_dtype": feature_dtype,
                                        "model_name": "synthetic"})
    writer.open()
    for name, n in (("train", n_train), ("val", n_val)):
        gen = np.random.default_rng([seed, 0 if name == "train" else 1])
        n_docs = -(-n // ROWS_PER_DOC)
        doc_index = (np.arange(n) // ROWS_PER_DOC).astype(np.int32)
        labels = np.zeros(n, dtype=np.int8)  # filled as the rows are drawn, stored after them
        plan = SplitPlan(name=name, doc_ids=[f"{name}-{i}" for i in range(n_docs)],
                         doc_n_tokens=np.full(n_docs, 512, dtype=np.int32), doc_n_needles=np.ones(n_docs, dtype=np.int32),
                         labels=labels, doc_index=doc_index, token_index=(np.arange(n) % ROWS_PER_DOC).astype(np.int32),
                         token_id=np.zeros(n, dtype=np.int32), stats={"docs": n_docs, "tokens": n_docs * 512})
        group, _ = writer.prepare_split(plan, list(layers), d, feature_dtype)
        for a in range(0, n, block_rows):
            x, y = _rows(gen, min(n, a + block_rows) - a, d, basis, w, outliers)
            labels[a : a + len(y)] = y
            for layer in layers:
                stored = x
                if feature_dtype == "bfloat16":
                    stored = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bfloat16 bits
                elif feature_dtype != "float32":
                    stored = x.astype(STORAGE_DTYPES[feature_dtype])
                group[f"layer_{layer}"][a : a + len(y)] = stored
        group["labels"][:] = labels
        group.attrs.update({"committed_rows": n, "complete": True})
    writer.finish(["train", "val"], {})
    return open_cache(str(path))
