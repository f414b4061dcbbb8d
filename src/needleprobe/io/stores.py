"""Remote stores: ``probe.cache_dir`` and ``probe.output_dir`` as fsspec URLs (``s3://``, ``gs://``, ``memory://``).

Zarr reads and writes a URL natively (its ``FsspecStore``); everything else
needleprobe does with paths goes through :func:`as_path`, which returns a
:class:`pathlib.Path` for a local path and a :class:`RemotePath` (the few
``pathlib`` methods needleprobe uses, on an fsspec filesystem) for a URL.

What a remote store cannot give, stated plainly:

* **no locks**: ``flock`` needs a local (or NFS) file, so on a remote store the
  "one extract or fit at a time" guard is skipped with a warning; running one
  writer per cache (and per output directory) is the user's job there.
* **no atomic rename**: a new cache's root group is written in one object (its
  ``zarr.json`` carries the fingerprint), and probe files are written in one
  ``put`` each, which object stores (S3, GCS) apply atomically; a deleted
  cache (``--overwrite``) is removed object by object.

Commit counters stay correct: a split's ``committed_rows`` lives in its group's
``zarr.json``, rewritten only after the chunk objects it covers were written,
and S3 and GCS give read-after-write consistency for single objects.
"""

from __future__ import annotations

import fnmatch
import posixpath
from pathlib import Path
from typing import Any

from ..errors import NeedleprobeError

_LOCAL_PROTOCOLS = ("local://",)


def is_url(p: Any) -> bool:
    """A remote (fsspec) location: a :class:`RemotePath` or a string with a protocol (``memory://x``)."""
    if isinstance(p, RemotePath):
        return True
    return isinstance(p, str) and "://" in p and not p.startswith(_LOCAL_PROTOCOLS)


def as_path(p: Any) -> "Path | RemotePath":
    """``RemotePath`` for a URL, ``Path`` otherwise."""
    if isinstance(p, (Path, RemotePath)):
        return p
    if is_url(p):
        return RemotePath(p)
    return Path(p)


def open_group(path: Any, **kwargs):
    """``zarr.open_group`` on a local path or a URL (``file://`` gets its directories made as needed)."""
    import zarr

    if isinstance(path, RemotePath) and path.protocol in ("file", "local"):
        kwargs.setdefault("storage_options", {"auto_mkdir": True})
    return zarr.open_group(str(path), **kwargs)


class RemotePath:
    """A location on an fsspec filesystem with the subset of ``pathlib.Path`` needleprobe uses.

    ``str()`` gives the URL back, which is what ``zarr.open_group`` wants.
    """

    def __init__(self, url: str):
        proto, _, rest = str(url).partition("://")
        self.protocol = proto
        self._path = posixpath.normpath("/" + rest.strip("/")) if rest.strip("/") else "/"

    @property
    def fs(self):
        """The fsspec filesystem (one instance per protocol: fsspec caches them)."""
        try:
            import fsspec

            return fsspec.filesystem(self.protocol)
        except (ImportError, ValueError) as e:
            raise NeedleprobeError(f"{self.url}: cannot use this store ({e})") from None

    # -- naming --------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{self.protocol}://{self._path if self.protocol == 'file' else self._path.lstrip('/')}"

    @property
    def fspath(self) -> str:
        """The path as the fsspec filesystem names it."""
        return self.fs._strip_protocol(self.url)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __lt__(self, other: "RemotePath") -> bool:
        return self.url < other.url

    def __hash__(self) -> int:
        return hash(self.url)

    def _new(self, path: str) -> "RemotePath":
        return RemotePath(f"{self.protocol}://{path}")

    def __truediv__(self, part: str) -> "RemotePath":
        return self._new(posixpath.join(self._path, str(part)))

    @property
    def name(self) -> str:
        return posixpath.basename(self._path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> "RemotePath":
        return self._new(posixpath.dirname(self._path))

    def with_name(self, name: str) -> "RemotePath":
        return self.parent / name

    def with_suffix(self, suffix: str) -> "RemotePath":
        return self.parent / (posixpath.splitext(self.name)[0] + suffix)

    # -- filesystem ------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self.fs.exists(self.fspath))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.fspath))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.fspath))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.makedirs(self.fspath, exist_ok=True)  # object stores have no directories: a no-op there

    def open(self, mode: str = "r", **kwargs):
        return self.fs.open(self.fspath, mode, **kwargs)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.fspath)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """One ``put``: atomic on object stores (readers see the old object or the new one)."""
        self.fs.pipe_file(self.fspath, data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        self.fs.rm_file(self.fspath)

    def rmtree(self) -> None:
        self.fs.rm(self.fspath, recursive=True)

    def glob(self, pattern: str) -> list["RemotePath"]:
        if not self.is_dir():
            return []
        out = []
        for entry in self.fs.ls(self.fspath, detail=False):
            name = posixpath.basename(str(entry).rstrip("/"))
            if fnmatch.fnmatchcase(name, pattern):
                out.append(self / name)
        return out

    def du(self) -> int:
        try:
            return int(self.fs.du(self.fspath, total=True))
        except (OSError, ValueError):
            return 0

