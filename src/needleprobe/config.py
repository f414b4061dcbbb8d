"""Typed, validated configuration.

One YAML file (``configs/*.yaml``) drives every stage.  Its keys are a contract
with users' config files, so they are declared once here as dataclass fields,
each documented where it is declared.  Validation lives here and nowhere else:
an unknown key, a wrong type or an impossible value is a
:class:`~needleprobe.errors.NeedleprobeError` naming the file, line and key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import NeedleprobeError

EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"
EMBEDDED_CHAT_MODEL = "embedded:SmolLM2-135M-Instruct"
"""Packaged models that load offline: a sentence encoder (fast tests) and an instruction-tuned chat model (a GGUF)."""
RUNTIME_ONLY = frozenset({("probe", "doc_batch_size"), ("probe", "max_batch_tokens"), ("probe", "device"),
                          ("probe", "fit_memory")})
"""Settings that change how fast a run goes, never what it writes (beyond float rounding: see README "Determinism")."""
RUN_SETTINGS = ("layers_to_probe", "train_seeds", "l2_grid", "class_balance", "solver", "max_train_docs", "max_val_docs",
                "max_train_tokens", "max_val_tokens")
"""``probe`` settings that fit's flags may set: a run remembers them in its record, so the commands that read a run
take them from there (``records.run_config``) and the flags are never typed twice."""
DTYPES = ("float32", "bfloat16", "float16")
SITES: tuple[str, ...] = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post")
"""Activation sites, TransformerLens' ``blocks.{L}.hook_{site}`` names (see :mod:`needleprobe.extract.sites`)."""
DEFAULT_L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
"""L2 strengths tried by default (README, "A chat model against a sentence encoder"): on the demo data the selected value
lands at 0.01–0.1 for a sentence encoder (all-MiniLM-L6-v2) and at 0.1–10 for a chat model (SmolLM2-135M-Instruct),
inside the grid for both; at 1e4 the probe is at its strong-L2 limit (the class-mean difference on standardised
features: val AUROC within 2.2e-5 of L2 = 1e6 on both)."""
PLACEHOLDERS = ("model", "site", "dataset")
"""What ``probe.output_dir`` and ``probe.run_record_dir`` may name, so runs of several models stay apart."""


def template_fields(template: str) -> list[str]:
    """Placeholder names in a path template (``{model}`` → ``model``); a malformed one raises ValueError."""
    import string

    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``8MB`` → 8,000,000; ``512MiB`` → 536,870,912; a bare number is bytes (ValueError when unreadable)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _BYTE_UNITS:
        raise ValueError(f"expected a size such as 8MB, 512MiB or 40GB, got {text!r}")
    return int(float(m.group(1)) * _BYTE_UNITS[unit])


def _template_problem(template: str) -> str | None:
    try:
        fields = template_fields(template)
    except ValueError as e:
        return f"malformed placeholder in {template!r} ({e})"
    bad = [f for f in fields if f not in PLACEHOLDERS]
    if bad:
        return f"unknown placeholder {{{bad[0]}}} in {template!r} (use {', '.join('{' + p + '}' for p in PLACEHOLDERS)})"
    return None


@dataclass
class DatasetConfig:
    name: str = "needles_main"
    """Dataset name; outputs are keyed by ``{name}_{version}``."""
    version: str = "v1"
    """Dataset version; a new version of the data gets its own cache and results."""
    path: Optional[str] = None
    """JSONL path; ``null`` means ``data/datasets/{name}_{version}.jsonl``."""
    val_fraction: float = 0.2
    """Share of documents without a ``split`` field assigned to val (by a hash of doc_id)."""
    config_dir: Optional[str] = field(default=None, compare=False, repr=False, metadata={"internal": True})
    """Directory of the config file this came from (not a config key): a relative ``path`` is read beside it."""

    def resolved_path(self) -> Path:
        """The JSONL file: a relative ``path`` is relative to the config file (then the working directory, as before).

        The default path is relative to the working directory, as the project layout places ``data/`` beside ``configs/``.
        """
        if not self.path:
            return Path("data/datasets") / f"{self.name}_{self.version}.jsonl"
        p = Path(self.path)
        if p.is_absolute() or self.config_dir is None:
            return p
        beside = Path(self.config_dir) / p
        return p if p.is_file() and not beside.is_file() else beside

    @property
    def key(self) -> str:
        return f"{self.name}_{self.version}"


@dataclass
class ModelConfig:
    name: str = "google/gemma-3-4b-it"
    """HF hub id, a local model directory, ``embedded:all-MiniLM-L6-v2`` or ``embedded:SmolLM2-135M-Instruct``
    (packaged, offline)."""
    revision: Optional[str] = None
    """HF revision (branch, tag or commit) for hub ids."""
    gguf_file: Optional[str] = None
    """A GGUF file: a name inside ``name``'s directory (or hub repository), or a path.  Weights and tokenizer are
    read from it and de-quantized to float32 once, into a user cache (:mod:`needleprobe.model.checkpoints`)."""
    max_length: int = 2048
    """Documents longer than this many tokens are truncated (losses are reported)."""
    chat_template: bool = False
    """Wrap each document as a user turn with the tokenizer's chat template."""


@dataclass
class ProbeConfig:
    layers_to_probe: list[int] = field(default_factory=lambda: [8, 16, 24])
    """Block indices (0-based) whose output (resid_post) is cached and probed."""
    activation_site: Union[str, list[str]] = "resid_post"
    """Where activations come from (TransformerLens' names): ``resid_pre``, ``resid_mid``, ``attn_out``, ``mlp_out``,
    ``resid_post`` (block L's output), or a list of them, filled from one forward pass, one cache per site."""
    negatives_per_doc: int = 32
    """Non-needle tokens sampled per document as negatives."""
    max_train_docs: Optional[int] = None
    """Keep only the first N train documents (file order)."""
    max_val_docs: Optional[int] = None
    """Keep only the first N val documents (file order)."""
    max_train_tokens: Optional[int] = None
    """Keep train documents (file order) while their total input tokens stay within N."""
    max_val_tokens: Optional[int] = None
    """Keep val documents (file order) while their total input tokens stay within N."""
    batch_size: int = 4096
    """Rows per step of the ``minibatch`` solver."""
    num_epochs: int = 20
    """Epochs of the ``minibatch`` solver."""
    learning_rate: float = 0.001
    """Adam learning rate of the ``minibatch`` solver."""
    l2_grid: list[float] = field(default_factory=lambda: list(DEFAULT_L2_GRID))
    """L2 strengths tried; the one with the best val AUROC is selected."""
    class_balance: Literal["weighted", "downsample"] = "weighted"
    """``weighted``: balanced sample weights; ``downsample``: 1:1 negatives drawn with the training seed."""
    train_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """One probe per seed and layer."""
    sampling_seed: int = 0
    """Seed of the negative-token sampling, independent of training seeds."""
    solver: Literal["auto", "lbfgs", "minibatch"] = "auto"
    """``auto`` and ``lbfgs``: exact L-BFGS, in memory when a layer's rows fit ``fit_memory``, else out of core
    (streamed from the cache), across processes under ``torchrun``; ``minibatch``: Adam (approximate), by name only."""
    fit_memory: Optional[str] = None
    """Memory a fit may hold per device (``8MB``, ``512MiB``, ``40GB``; ``--fit-memory``): decides in memory or out of
    core; ``null``: half the free memory of the fit's device (host memory on CPU, divided among torchrun's processes)."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where the model and the probe fits run; ``auto`` prefers CUDA, then MPS."""
    model_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype of the model weights during extraction."""
    feature_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype activations are stored in (bfloat16 is stored bit-exactly as uint16)."""
    doc_batch_size: Optional[int] = None
    """Documents per forward pass (``--doc-batch-size``); rows never depend on it.  Unset, with
    ``max_batch_tokens`` unset too: 8 on CPU and MPS, a token budget from free memory on CUDA (:mod:`needleprobe.extract.batching`)."""

    @property
    def sites(self) -> list[str]:
        """``activation_site`` as a list (a single name is the common form)."""
        return [self.activation_site] if isinstance(self.activation_site, str) else list(self.activation_site)
    max_batch_tokens: Optional[int] = None
    """Alternative batch budget: padded tokens per forward (``--max-batch-tokens``)."""
    cache_dir: str = "cache/activations"
    """Root of the Zarr activation caches."""
    output_dir: str = "results/probes"
    """Probe weights, metadata and metrics go to ``{output_dir}/{name}_{version}/``."""
    run_record_dir: str = "results/run_records"
    """Run records go here."""


@dataclass
class MonitorConfig:
    top_k: int = 5
    """k of the top-k-mean aggregation."""
    window: int = 40
    """Window (tokens) of the max-of-rolling-mean aggregation."""
    temperature: float = 5.0
    """Temperature of the softmax-weighted mean aggregation."""
    split: str = "test"
    """Split the monitor scores by default."""
    calibration_split: str = "val"
    """Split whose needle-free documents set the thresholds (and whose document AUROC picks the aggregation)."""


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    source: Optional[str] = field(default=None, compare=False)
    """File the config was read from (not a config key)."""
    fitted: Optional[dict] = field(default=None, compare=False, repr=False, metadata={"internal": True})
    """Not a config key: the ``RUN_SETTINGS`` the run was fitted with, read from its record, when this config
    describes a run (``records.run_config``; its probe section then holds them, narrowed by flags)."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        d.pop("fitted")
        for section in (self.dataset, self.model, self.probe, self.monitor):
            name = {DatasetConfig: "dataset", ModelConfig: "model", ProbeConfig: "probe", MonitorConfig: "monitor"}[type(section)]
            for f in dataclasses.fields(section):
                if f.metadata.get("internal"):
                    d[name].pop(f.name)
        return d

    def for_site(self, site: str) -> "Config":
        """This config for one of its activation sites (each site is a run of its own: cache, probes, outputs)."""
        new = dataclasses.replace(self, probe=dataclasses.replace(self.probe, activation_site=site))
        new.source = self.source
        return new

    def single_site(self, what: str) -> "Config":
        """This config when it names one site; several are refused for stages that work per site."""
        sites = self.probe.sites
        if len(sites) != 1:
            raise NeedleprobeError(
                f"{what} works on one activation site at a time and this config lists {', '.join(sites)}: "
                "call it once per site (Config.for_site), as the command line does"
            )
        return self if isinstance(self.probe.activation_site, str) else self.for_site(sites[0])

    def outcome_dict(self) -> dict[str, Any]:
        """``to_dict`` without the runtime-only settings: what must match for outputs to match."""
        d = self.to_dict()
        for section, key in RUNTIME_ONLY:
            d[section].pop(key)
        return d


# ---------------------------------------------------------------------------
# loading and validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    bad = NeedleprobeError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except NeedleprobeError:
                pass
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported annotation {tp}")


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each YAML key path to its 1-based line, so errors can point at it."""
    lines: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (str(k.value),)
                lines[p] = k.start_mark.line + 1
                walk(v, p)

    walk(root, ())
    return lines


def _build(cls: type, data: Any, path: tuple[str, ...], loc: "_Locator") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise NeedleprobeError(f"{loc(path)}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source" and not f.metadata.get("internal")}
    for key in data:
        if key not in names:
            raise NeedleprobeError(
                f"{loc(path + (str(key),))}: unknown key (allowed: {', '.join(sorted(names))})"
            )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], path + (name,), loc)
        else:
            kwargs[name] = _coerce(data[name], tp, loc(path + (name,)))
    return cls(**kwargs)


class _Locator:
    def __init__(self, source: str | None, lines: dict[tuple[str, ...], int]):
        self.source, self.lines = source, lines

    def __call__(self, path: tuple[str, ...]) -> str:
        key = ".".join(path) or "<root>"
        if self.source is None:
            return f"config key {key}"
        line = self.lines.get(path)
        return f"{self.source}:{line}: {key}" if line else f"{self.source}: {key}"


def validate(cfg: Config, loc: _Locator | None = None) -> Config:
    """Value checks that types cannot express; raises naming the key."""
    loc = loc or _Locator(cfg.source, {})

    def need(ok: bool, path: str, msg: str) -> None:
        if not ok:
            raise NeedleprobeError(f"{loc(tuple(path.split('.')))}: {msg}")

    d, m, p, mon = cfg.dataset, cfg.model, cfg.probe, cfg.monitor
    need(0.0 <= d.val_fraction < 1.0, "dataset.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    for key in ("name", "version"):
        v = getattr(d, key)
        need(bool(v) and "/" not in v and v.strip() == v, f"dataset.{key}", f"must be a non-empty name without '/', got {v!r}")
    need(bool(m.name), "model.name", "must not be empty")
    if m.gguf_file is not None:
        need(bool(m.gguf_file.strip()), "model.gguf_file", "must not be empty (or null: no GGUF file)")
        need(not m.name.startswith("embedded:"), "model.gguf_file",
             f"{m.name} is a packaged model (it names its own weights): leave model.gguf_file unset")
    need(m.max_length >= 2, "model.max_length", f"must be >= 2, got {m.max_length}")
    need(len(p.layers_to_probe) > 0, "probe.layers_to_probe", "must list at least one layer")
    need(all(x >= 0 for x in p.layers_to_probe), "probe.layers_to_probe", f"layers must be >= 0, got {p.layers_to_probe}")
    need(len(set(p.layers_to_probe)) == len(p.layers_to_probe), "probe.layers_to_probe", f"duplicate layers in {p.layers_to_probe}")
    need(p.negatives_per_doc >= 0, "probe.negatives_per_doc", f"must be >= 0, got {p.negatives_per_doc}")
    for key in ("max_train_docs", "max_val_docs", "max_train_tokens", "max_val_tokens", "max_batch_tokens"):
        v = getattr(p, key)
        need(v is None or v > 0, f"probe.{key}", f"must be positive or null, got {v}")
    need(p.batch_size > 0, "probe.batch_size", f"must be positive, got {p.batch_size}")
    need(p.num_epochs > 0, "probe.num_epochs", f"must be positive, got {p.num_epochs}")
    need(p.learning_rate > 0, "probe.learning_rate", f"must be positive, got {p.learning_rate}")
    need(len(p.l2_grid) > 0, "probe.l2_grid", "must list at least one value")
    need(all(x > 0 for x in p.l2_grid), "probe.l2_grid", f"values must be > 0, got {p.l2_grid}")
    need(len(set(p.l2_grid)) == len(p.l2_grid), "probe.l2_grid", f"duplicate values in {p.l2_grid}")
    need(len(p.train_seeds) > 0, "probe.train_seeds", "must list at least one seed")
    need(len(set(p.train_seeds)) == len(p.train_seeds), "probe.train_seeds", f"duplicate seeds in {p.train_seeds}")
    need(p.doc_batch_size is None or p.doc_batch_size > 0, "probe.doc_batch_size",
         f"must be positive or null, got {p.doc_batch_size}")
    if p.fit_memory is not None:
        try:
            size = parse_bytes(p.fit_memory)
        except ValueError as e:
            need(False, "probe.fit_memory", str(e))
        need(size > 0, "probe.fit_memory", f"must be positive, got {p.fit_memory!r}")
    need(mon.top_k > 0, "monitor.top_k", f"must be positive, got {mon.top_k}")
    need(mon.window > 0, "monitor.window", f"must be positive, got {mon.window}")
    need(mon.temperature > 0, "monitor.temperature", f"must be positive, got {mon.temperature}")
    need(mon.split in ("train", "val", "test"), "monitor.split", f"must be train, val or test, got {mon.split!r}")
    need(mon.calibration_split in ("train", "val", "test"), "monitor.calibration_split",
         f"must be train, val or test, got {mon.calibration_split!r}")
    sites = p.sites
    need(len(sites) > 0, "probe.activation_site", "must name at least one site")
    bad = [x for x in sites if x not in SITES]
    need(not bad, "probe.activation_site", f"unknown site {bad[0] if bad else ''!r} (sites: {', '.join(SITES)})")
    need(len(set(sites)) == len(sites), "probe.activation_site", f"duplicate sites in {sites}")
    for key in ("output_dir", "run_record_dir"):
        problem = _template_problem(getattr(p, key))
        need(problem is None, f"probe.{key}", problem or "")
    return cfg


def _looks_like_dataset(text: str) -> bool:
    """A JSON-lines document (``{"doc_id": …, "text": …}``) handed over where a config was expected."""
    import json

    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        obj = json.loads(first)
    except ValueError:
        return False
    return isinstance(obj, dict) and bool({"doc_id", "text", "needle_spans"} & set(obj))


def load_config(path: str | Path, *, default: bool = False) -> Config:
    """Read and validate a YAML config; every error names the file, line and key.

    ``default``: the path was not given by the user, so a missing file is explained as the default one.
    """
    from .data.documents import read_utf8

    path = Path(path)
    try:
        text = read_utf8(path)  # not UTF-8: the line and byte, as for a dataset
    except FileNotFoundError:
        if default:
            raise NeedleprobeError(
                f"{path}: no --config given, and the default config file is not here "
                "(run from the project directory, or pass --config FILE)"
            ) from None
        raise NeedleprobeError(f"{path}: config file not found") from None
    except OSError as e:
        raise NeedleprobeError(f"{path}: cannot read config ({e.strerror})") from None
    if _looks_like_dataset(text):
        raise NeedleprobeError(
            f"{path}: this is a dataset (JSON lines), not a config; name it in a YAML config "
            f"(dataset.path: {path}) and pass that config with --config (configs/demo.yaml is an example)"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise NeedleprobeError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        raise NeedleprobeError(
            f"{path}: config file is empty; start from configs/dataset_main.yaml, which spells out every key"
        )
    loc = _Locator(str(path), _key_lines(text))
    cfg = _build(Config, data, (), loc)
    cfg.source = str(path)
    cfg.dataset.config_dir = str(path.parent)
    return validate(cfg, loc)


def config_from_dict(data: dict[str, Any], source: str | None = None) -> Config:
    """A config from its dict form (``Config.to_dict``, as a probe's ``.json`` and a run record hold it), validated."""
    cfg = _build(Config, data, (), _Locator(source, {}))
    cfg.source = source
    return validate(cfg)


def with_overrides(cfg: Config, **probe_overrides: Any) -> Config:
    """Apply command-line overrides (``None`` means "not given") and re-validate."""
    given = {k: v for k, v in probe_overrides.items() if v is not None}
    if not given:
        return cfg
    hints = typing.get_type_hints(ProbeConfig)
    for k, v in given.items():
        given[k] = _coerce(v, hints[k], f"--{k.replace('_', '-')}")
    new = dataclasses.replace(cfg, probe=dataclasses.replace(cfg.probe, **given))
    new.source = cfg.source
    return validate(new)
