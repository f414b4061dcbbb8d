"""A fitted run, read: its probes, the best probe, its record.

Every reader of a run directory (``monitor``, ``evaluate``, ``errors``,
``check``, ``report``, and notebooks through :func:`load_probes`) asks a
:class:`Run`.  File names come from :class:`~needleprobe.run.layout.Layout`
(the only place that joins paths or parses probe names), and the best probe
from :func:`~needleprobe.fit.verdict.ranked_layers` (the one ranking, the same
the verdict prints).  This module sits above the fit stage because it loads
:class:`~needleprobe.fit.probe.LinearProbe`; the fit stage writes a run through
the layout and never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, load_config
from ..errors import NeedleprobeError
from ..fit.probe import LinearProbe
from ..fit.verdict import ranked_layers
from ..io.stores import as_path
from ..run.layout import Layout, probe_metadata, probe_stem
from ..run.record import read_run_record

Key = tuple[int, int]
"""(layer, seed)"""


@dataclass(frozen=True)
class Run:
    """One run directory (and, from a config, its run record) as the readers see it."""

    run_dir: Path
    layout: Layout | None = None
    """None for a bare probe directory (:meth:`at`): only its probes can be read"""

    @classmethod
    def of(cls, cfg: Config, run: str | None = None) -> "Run":
        layout = Layout.from_config(cfg, run)
        return cls(layout.run_dir, layout)

    @classmethod
    def of_layout(cls, layout: Layout) -> "Run":
        return cls(layout.run_dir, layout)

    @classmethod
    def at(cls, directory: str | Path) -> "Run":
        return cls(as_path(directory))

    # -- probes ----------------------------------------------------------------
    def metadata(self) -> dict[Key, dict[str, Any]]:
        """(layer, seed) → each probe's JSON metadata ({} when unreadable), in layer and seed order."""
        return probe_metadata(self.run_dir)

    def weight_files(self) -> list[Key]:
        """(layer, seed) of every ``.pt`` in the directory."""
        return list(probe_metadata(self.run_dir, ".pt"))

    def files(self, layer: int, seed: int) -> tuple[Path, Path]:
        """The probe's (weights ``.pt``, metadata ``.json``)."""
        stem = probe_stem(self.run_dir, layer, seed)
        return stem.with_suffix(".pt"), stem.with_suffix(".json")

    def has(self, layer: int, seed: int) -> bool:
        return all(p.is_file() for p in self.files(layer, seed))

    def probe_path(self, layer: int, seed: int) -> Path:
        return self.files(layer, seed)[0]

    def probe(self, layer: int, seed: int) -> LinearProbe:
        return LinearProbe.load(self.probe_path(layer, seed))

    def probes(self, keys=None) -> dict[Key, LinearProbe]:
        """The probes of ``keys`` (default: every weight file here), in layer and seed order."""
        keys = self.weight_files() if keys is None else sorted(keys)
        return {k: self.probe(*k) for k in keys}

    def val_aurocs(self, keys=None) -> dict[Key, float]:
        """(layer, seed) → val AUROC from each probe's metadata (0 when it has none), for ``keys`` that exist."""
        meta = self.metadata()
        out = {}
        for k in (meta if keys is None else [k for k in keys if k in meta]):
            try:
                out[k] = float(meta[k]["val_metrics"]["auroc"])
            except (KeyError, TypeError, ValueError):
                out[k] = 0.0
        return out

    def best(self, layer: int | None = None, keys=None) -> Key:
        """The best probe (``ranked_layers``: val AUROC, then the layer's seed mean, then the earlier layer), or the
        best seed of ``layer``; among ``keys`` when given."""
        aurocs = self.val_aurocs(keys)
        if not aurocs:
            raise NeedleprobeError(f"{self.run_dir}: no probes here; run `needleprobe fit` first")
        ranked = ranked_layers(aurocs)
        if layer is None:
            return ranked[0]
        found = [k for k in ranked if k[0] == layer]
        if not found:
            have = ", ".join(str(x) for x in sorted({k[0] for k in ranked}))
            raise NeedleprobeError(f"{self.run_dir}: no probe of layer {layer} (probed layers: {have})")
        return found[0]

    def best_per_layer(self, keys=None) -> dict[int, int]:
        """layer → its best seed (the same ranking as :meth:`best`)."""
        return dict(sorted(ranked_layers(self.val_aurocs(keys))))

    # -- the record ------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """The run record ({} when there is none or it cannot be read)."""
        return {} if self.layout is None else read_run_record(self.layout.run_record)


def load_probes(source) -> dict[Key, LinearProbe]:
    """Every probe of a run, by (layer, seed): from a config (file or object, its default run) or a probe directory."""
    if isinstance(source, Config):
        run = Run.of(source)
    else:
        p = as_path(source)
        run = Run.of(load_config(p)) if p.suffix in (".yaml", ".yml") else Run.at(p)
    out = run.probes()
    if not out:
        raise NeedleprobeError(f"{run.run_dir}: no probe files (probe_layer_L_seed_S.pt) here; run `needleprobe fit` first")
    return out
