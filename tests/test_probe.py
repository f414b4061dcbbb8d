"""LinearProbe: the estimator users fit on their own arrays is exactly what `needleprobe fit` runs, and its files
are the files `fit` writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import probe_files, run_dir
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from needleprobe import LinearProbe, NeedleprobeError, load_probes, open_cache
from needleprobe.fit.probe import NOISE_FLOOR, feature_scale


def _arrays(cfg, layer):
    cache = open_cache(cfg)
    tr, va = cache.split("train"), cache.split("val")
    return tr.to_numpy(layer), tr.labels, va.to_numpy(layer), va.labels, va.doc_index


def test_fit_path_on_arrays_is_what_fit_wrote(minilm_run, tmp_path):
    """Same rows → the same weights, the same numbers, and `save` writes the same bytes as `needleprobe fit`."""
    _, cfg = minilm_run
    layer, seed = cfg.probe.layers_to_probe[0], cfg.probe.train_seeds[0]
    x, y, xv, yv, groups = _arrays(cfg, layer)
    probe = LinearProbe.fit_path(x, y, xv, yv, cfg.probe.l2_grid, val_groups=groups)
    pt, js = probe_files(cfg, layer, seed)
    written = LinearProbe.load(pt)
    np.testing.assert_array_equal(probe.coef_, written.coef_)
    assert probe.intercept_ == written.intercept_ and probe.selected_l2_ == written.selected_l2_
    assert probe.metadata_["l2_results"] == written.metadata_["l2_results"]
    assert probe.metadata_["val_metrics"] == written.metadata_["val_metrics"]
    # saving the loaded probe reproduces both files byte for byte
    stem = tmp_path / f"probe_layer_{layer}_seed_{seed}"
    out_pt, out_js = written.save(stem)
    assert out_pt.read_bytes() == pt.read_bytes() and out_js.read_bytes() == js.read_bytes()
    # and the arrays given were not modified (fit standardises its own copy)
    np.testing.assert_array_equal(x, _arrays(cfg, layer)[0])


def test_probe_agrees_with_scikit_learn_on_the_same_arrays(minilm_run):
    """At one L2: C = 1/(l2·n), balanced sample weights, standardised features → the same decision function."""
    _, cfg = minilm_run
    x, y, xv, yv, _ = _arrays(cfg, 1)
    l2 = 0.01
    probe = LinearProbe.fit_path(x, y, xv, yv, [l2])
    mean, std = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64)
    n, n_pos = len(y), int(y.sum())
    sw = np.where(y == 1, n / (2 * n_pos), n / (2 * (n - n_pos)))
    clf = LogisticRegression(C=1 / (l2 * n), tol=1e-10, max_iter=10000).fit((x - mean) / std, y, sample_weight=sw)
    ref = clf.decision_function((xv - mean) / std)
    ours = probe.decision_function(xv)
    assert np.corrcoef(ref, ours)[0, 1] > 0.99999
    assert abs(roc_auc_score(yv, ref) - roc_auc_score(yv, ours)) < 1e-4
    assert roc_auc_score(yv, ours) == pytest.approx(probe.val_auroc_, abs=1e-12)


def test_estimator_surface(minilm_run):
    _, cfg = minilm_run
    probe = LinearProbe.load(probe_files(cfg, 5, 0)[0])
    assert probe.coef_.dtype == np.float32 and probe.coef_.shape == (384,) and isinstance(probe.intercept_, float)
    assert probe.layer == 5 and probe.identity.model == cfg.model.name and "layer=5" in repr(probe)
    xv = open_cache(cfg).split("val").to_numpy(5)
    logits = probe.decision_function(xv)
    d = torch.load(probe_files(cfg, 5, 0)[0], weights_only=True)
    by_hand = (torch.from_numpy(xv) @ d["weight"][:, None] + d["bias"]).numpy()[:, 0]  # another BLAS: rounding only
    np.testing.assert_allclose(logits, by_hand, rtol=1e-5, atol=1e-5)
    proba = probe.predict_proba(xv)
    assert proba.shape == (len(xv), 2) and np.allclose(proba.sum(1), 1)
    np.testing.assert_array_equal(probe.predict(xv), (logits > 0).astype(np.int8))
    with pytest.raises(NeedleprobeError, match=r"the probe reads d_model 384, the activations have shape \(3, 64\)"):
        probe.decision_function(np.zeros((3, 64), np.float32))


def test_load_probes_from_a_config_a_directory_and_an_old_directory(minilm_run, tmp_path):
    cfg_path, cfg = minilm_run
    by_config = load_probes(cfg_path)
    assert sorted(by_config) == [(layer, seed) for layer in (1, 5) for seed in cfg.probe.train_seeds]
    by_dir = load_probes(run_dir(cfg))
    assert all(np.array_equal(by_config[k].coef_, by_dir[k].coef_) for k in by_config)
    old = tmp_path / "old"  # probe weights alone (no JSON): still loadable, metadata empty
    old.mkdir()
    (old / "probe_layer_1_seed_0.pt").write_bytes(probe_files(cfg, 1, 0)[0].read_bytes())
    (probe,) = load_probes(old).values()
    assert probe.metadata_ == {} and probe.d_model == 384
    with pytest.raises(NeedleprobeError, match="no probe files"):
        load_probes(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "probe_layer_1_seed_0.pt").write_bytes(b"not a probe")
    with pytest.raises(NeedleprobeError, match="not a probe file"):
        load_probes(tmp_path / "bad")


def test_rounding_noise_features_are_not_standardised_into_signal():
    """A feature that varies only at the level of rounding noise gets scale 1, so it cannot become a unit input."""
    rng = np.random.default_rng(0)
    mean = rng.normal(size=8)
    std = np.abs(rng.normal(size=8)) + 0.5
    std[3] = 1e-9  # rounding noise around a constant
    std[5] = 0.0
    scale = feature_scale(mean, std)
    assert scale[3] == scale[5] == 1.0 and np.array_equal(np.delete(scale, [3, 5]), np.delete(std, [3, 5]))
    rms = np.sqrt(np.mean(std**2) + np.mean(mean**2))
    assert feature_scale(mean, np.where(np.arange(8) == 2, 2 * NOISE_FLOOR * rms, std))[2] == 2 * NOISE_FLOOR * rms


def test_probe_selection_is_stable_under_rounding_sized_noise(minilm_run):
    """Activations perturbed by 1e-6 of their row's RMS (what another thread count may do): same L2, AUROC within 1e-4."""
    _, cfg = minilm_run
    x, y, xv, yv, groups = _arrays(cfg, 5)  # the last layer has near-constant dimensions
    rng = np.random.default_rng(0)

    def noisy(a):
        rms = np.sqrt((a.astype(np.float64) ** 2).mean(1, keepdims=True))
        return (a + (rng.random(a.shape) < 0.2) * rng.uniform(-1, 1, a.shape) * 1e-6 * rms).astype(np.float32)

    a = LinearProbe.fit_path(x, y, xv, yv, cfg.probe.l2_grid, val_groups=groups)
    b = LinearProbe.fit_path(noisy(x), y, noisy(xv), yv, cfg.probe.l2_grid, val_groups=groups)
    assert a.selected_l2_ == b.selected_l2_
    for ra, rb in zip(a.metadata_["l2_results"], b.metadata_["l2_results"]):
        assert abs(ra["val_auroc"] - rb["val_auroc"]) <= 1e-4, ra["l2"]


def test_fit_json_is_unchanged_in_form(minilm_run):
    """The seed's metadata contract: these keys, in every probe JSON."""
    _, cfg = minilm_run
    meta = json.loads(probe_files(cfg, 1, 0)[1].read_text())
    for k in ("layer", "seed", "selected_l2", "l2_results", "train_stats", "val_stats", "val_metrics", "cache_fingerprint",
              "config", "probe_applies_to"):
        assert k in meta
