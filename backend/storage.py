"""Where images and version artifacts live: one store on fsspec, local disk or S3-compatible.

:class:`ObjectStore` is a root on an fsspec filesystem: a local directory (fsspec's ``file``
filesystem; the default, ``<data_dir>``) or an S3-compatible bucket and prefix
(``PREFLOOP_STORAGE_URL=s3://bucket/prefix``, through s3fs). Everything above it speaks in
*relative keys* (``images/ab/cd/<sha256>.png``, ``versions/round-7/a1-3f9c.../adapter.safetensors``)
and never learns which one it is. Two roots hang off the store (:func:`image_store`,
:func:`artifact_store`), laid out as on local disk before object storage existed:

- ``images/``: :class:`ImageStore`, content-addressed image files (``ab/cd/<sha256>.<ext>``),
  written once and never modified, which is what lets ``GET /images/{id}`` answer with
  ``Cache-Control: immutable`` (and an API process keep them in memory, :class:`ByteCache`);
- ``models/``: version artifacts (a round's adapter and its validation grid), written under a
  prefix unique to the publishing attempt; the database row that names the adapter is the
  commit point (docs/scaling.md, "Object storage").

Writes are atomic per object on both: on local disk through :func:`backend.fileio.atomic_write`
(temporary file, fsync, rename), on S3 because a PUT (or a multipart upload, which s3fs aborts
on an error) becomes visible whole or not at all. A reader sees the old object or the whole
new one, never part.

Keys are checked (:meth:`ObjectStore.key`): a stored path that is absolute, contains ``..``
or a NUL, or (on disk) resolves outside the root through a link raises :class:`UnsafePath`,
so a bad row can never make the server read another file.

Torch-free: the API, the UI and the workers all use it.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import fsspec

from backend.fileio import atomic_write

if TYPE_CHECKING:
    from backend.settings import Settings

MEDIA_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
#: The sub-roots of the store (the local layout under ``data_dir`` before object storage).
IMAGES_PREFIX = "images"
MODELS_PREFIX = "models"
#: Downloaded artifacts (object storage only): ``<data_dir>/cache/artifacts/<sha256><ext>``.
ARTIFACT_CACHE_DIRNAME = "cache/artifacts"
CHUNK = 1 << 20


def sniff_media_type(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


class UnsafePath(ValueError):
    pass


class IntegrityError(RuntimeError):
    """A downloaded object's SHA-256 differs from the one asked for."""


def _is_local(protocol: str | None) -> bool:
    return protocol in (None, "", "file", "local")


class ObjectStore:
    """A root on an fsspec filesystem: a local directory or ``s3://bucket/prefix``.

    Args:
        url: a directory path, ``file:///dir``, or ``s3://bucket[/prefix]``.
        storage_options: keyword arguments of the fsspec filesystem (s3fs: ``endpoint_url``,
            ``key``, ``secret``, ``client_kwargs``...); ignored on local disk.
        cache_dir: where :meth:`fetch` keeps downloaded objects (object storage only).
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        _fs: Any = None,
    ) -> None:
        text = os.fspath(url)
        protocol, path = fsspec.core.split_protocol(text)
        self.is_local = _is_local(protocol)
        if self.is_local:
            self.fs = _fs or fsspec.filesystem("file")
            self.root = Path(path).expanduser().resolve().as_posix()
            self.url = self.root
        elif protocol in ("s3", "s3a"):
            # No listing cache: another process may have written an object since we looked.
            opts = {"use_listings_cache": False, **(storage_options or {})}
            self.fs = _fs or fsspec.filesystem("s3", **opts)
            self.root = path.strip("/")
            if not self.root:
                raise ValueError(f"no bucket in {text!r}")
            self.url = f"s3://{self.root}"
        else:
            raise ValueError(f"unsupported storage URL {text!r}: use a path, file:// or s3://")
        self.protocol = "file" if self.is_local else "s3"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    def child(self, prefix: str, *, cache_dir: str | os.PathLike[str] | None = None) -> ObjectStore:
        """The store rooted at ``prefix`` inside this one (same filesystem, same connection)."""
        key = self.key(prefix)
        out = ObjectStore.__new__(ObjectStore)
        out.fs, out.is_local, out.protocol = self.fs, self.is_local, self.protocol
        out.root = key
        out.url = key if self.is_local else f"s3://{key}"
        out.cache_dir = Path(cache_dir) if cache_dir is not None else self.cache_dir
        return out

    # ------------------------------------------------------------------------ keys
    def key(self, rel: str) -> str:
        """The filesystem path of ``rel``; :class:`UnsafePath` if it could leave the root."""
        if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
            raise UnsafePath(rel)
        if rel.startswith("/") or os.path.isabs(rel):
            raise UnsafePath(rel)
        norm = posixpath.normpath(rel)
        if norm in (".", "..") or norm.startswith("../"):
            raise UnsafePath(rel)
        key = f"{self.root}/{norm}"
        if self.is_local:
            # A link inside the root must not lead out of it.
            if not Path(key).resolve().is_relative_to(self.root):
                raise UnsafePath(rel)
        return key

    def local_path(self, rel: str) -> Path | None:
        """The file of ``rel`` on local disk, or None on object storage."""
        return Path(self.key(rel)) if self.is_local else None

    # ------------------------------------------------------------------------ reads
    def read(self, rel: str, *, limit: int | None = None) -> bytes:
        """The object's bytes (at most ``limit`` of them when given).
        Raises FileNotFoundError when there is none."""
        key = self.key(rel)
        # s3fs asks for the size first (a HEAD) unless told to read in one request.
        kw = {} if self.is_local else {"max_concurrency": 1}
        if limit is None:
            return bytes(self.fs.cat_file(key, **kw))
        return bytes(self.fs.cat_file(key, start=0, end=limit, **kw))

    def open(self, rel: str) -> IO[bytes]:
        return self.fs.open(self.key(rel), "rb")  # type: ignore[no-any-return]

    def exists(self, rel: str) -> bool:
        return bool(self.fs.isfile(self.key(rel)))

    def listdir(self, rel: str) -> list[str]:
        """The names directly under ``rel`` (files and "directories"); empty when none."""
        key = self.key(rel)
        try:
            entries = self.fs.ls(key, detail=False)
        except FileNotFoundError:
            return []
        return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries} - {""})

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.open(rel) as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                h.update(chunk)
        return h.hexdigest()

    def presign(self, rel: str, expires_s: int = 3600) -> str | None:
        """A URL that fetches the object without credentials for ``expires_s`` seconds
        (object storage), or None on local disk."""
        if self.is_local:
            return None
        return str(self.fs.sign(self.key(rel), expiration=expires_s))

    def fetch(self, rel: str, sha256: str | None = None) -> Path:
        """A local file with the object's bytes: the file itself on local disk; on object
        storage a copy in ``cache_dir`` named by its SHA-256 (downloaded once, checked against
        ``sha256`` before it is kept: :class:`IntegrityError`). Raises FileNotFoundError."""
        local = self.local_path(rel)
        if local is not None:
            if not local.is_file():
                raise FileNotFoundError(local)
            return local
        if self.cache_dir is None:
            raise RuntimeError(f"{self!r} has no cache_dir to fetch {rel!r} into")
        ext = posixpath.splitext(rel)[1]
        if sha256:
            cached = self.cache_dir / f"{sha256}{ext}"
            if cached.is_file():
                return cached
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        tmp = self.cache_dir / f".{os.getpid()}.{threading.get_ident()}.download"
        try:
            with self.open(rel) as src, open(tmp, "wb") as out:
                for chunk in iter(lambda: src.read(CHUNK), b""):
                    h.update(chunk)
                    out.write(chunk)
            actual = h.hexdigest()
            if sha256 and actual != sha256:
                raise IntegrityError(
                    f"{self.url}/{rel} has sha256 {actual}, expected {sha256}; not cached"
                )
            cached = self.cache_dir / f"{actual}{ext}"
            os.replace(tmp, cached)
        finally:
            tmp.unlink(missing_ok=True)
        return cached

    # ------------------------------------------------------------------------ writes
    def put_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` at ``rel`` atomically (readers see all of it or the old object)."""
        key = self.key(rel)
        if self.is_local:
            atomic_write(key, data)
        else:
            self.fs.pipe_file(key, bytes(data))

    def put_file(self, rel: str, src: str | os.PathLike[str]) -> None:
        """Copy the local file ``src`` to ``rel`` atomically (streamed; multipart on S3)."""
        key = self.key(rel)
        if self.is_local:
            with open(src, "rb") as fh:
                atomic_write(key, fh)
        else:
            self.fs.put_file(os.fspath(src), key)

    def put_dir(self, rel: str, src: str | os.PathLike[str], *, last: str | None = None) -> None:
        """Copy the files of the local directory ``src`` (not recursive) under ``rel``; the
        file named ``last`` (a manifest that readers start from) is written after all others."""
        names = sorted(p.name for p in Path(src).iterdir() if p.is_file())
        if last is not None and last in names:
            names.remove(last)
            names.append(last)
        for name in names:
            self.put_file(f"{rel}/{name}", Path(src) / name)

    def delete(self, rel: str) -> bool:
        """Remove one object; False when there was none."""
        try:
            self.fs.rm_file(self.key(rel))
        except FileNotFoundError:
            return False
        return True

    def delete_tree(self, rel: str) -> None:
        """Remove everything under ``rel`` (nothing there is fine)."""
        key = self.key(rel)
        try:
            if self.fs.exists(key):
                self.fs.rm(key, recursive=True)
        except FileNotFoundError:
            pass


class ByteCache:
    """A thread-safe LRU of immutable objects' bytes, bounded in total size."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes // 8:  # one object never takes most of the cache
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = data
            self._size += len(data)
            while self._size > self.max_bytes and self._items:
                _, old = self._items.popitem(last=False)
                self._size -= len(old)


class ImageStore:
    """Content-addressed image files: ``ab/cd/<sha256>.<ext>`` under a root of the store.

    ``root``: an :class:`ObjectStore` (its whole root holds the images), or a directory or
    URL. ``cache_bytes``: keep up to this many bytes of read images in memory (images never
    change; used by the API on object storage)."""

    def __init__(self, root: ObjectStore | str | os.PathLike[str], *, cache_bytes: int = 0):
        self.objects = root if isinstance(root, ObjectStore) else ObjectStore(root)
        self.cache = ByteCache(cache_bytes) if cache_bytes > 0 else None

    @property
    def root(self) -> Path | str:
        """The local directory (local disk), or the store's URL."""
        return Path(self.objects.root) if self.objects.is_local else self.objects.url

    @property
    def is_local(self) -> bool:
        return self.objects.is_local

    def save(
        self,
        data: bytes,
        media_type: str,
        *,
        on_create: Callable[[ImageStore, str], None] | None = None,
    ) -> tuple[str, str]:
        """Store ``data``; returns ``(relative_path, sha256)``. Idempotent per content.
        ``on_create(store, relative_path)`` is called when this call created the object (see
        :mod:`backend.staging`)."""
        ext = MEDIA_EXTENSIONS.get(media_type)
        if ext is None:
            raise ValueError(f"unsupported image type {media_type!r}")
        digest = hashlib.sha256(data).hexdigest()
        rel = f"{digest[:2]}/{digest[2:4]}/{digest}.{ext}"
        if not self.objects.exists(rel):
            self.objects.put_bytes(rel, data)
            if on_create is not None:
                on_create(self, rel)
        return rel, digest

    def resolve(self, rel: str) -> Path:
        """The local file of a stored image (local disk only); :class:`UnsafePath` outside the
        root."""
        path = self.objects.local_path(rel)
        if path is None:
            raise RuntimeError("images are on object storage: use read()")
        return path

    def read(self, rel: str) -> bytes:
        """The image's bytes; FileNotFoundError when missing, :class:`UnsafePath` for a key
        outside the root."""
        if self.cache is None:
            return self.objects.read(rel)
        key = self.objects.key(rel)
        data = self.cache.get(key)
        if data is None:
            data = self.objects.read(rel)
            self.cache.put(key, data)
        return data

    def delete(self, rel: str) -> bool:
        """Remove a stored image (a rolled-back write). A cached copy may stay: content
        addressing makes it right for any later object at that key."""
        return self.objects.delete(rel)

    def iter_files(self) -> Iterator[str]:
        """Every stored image's relative path (tests and tools)."""
        prefix = self.objects.root.rstrip("/") + "/"
        for path in self.objects.fs.find(self.objects.root):
            path = str(path)
            if path.startswith(prefix) and not posixpath.basename(path).startswith("."):
                yield path[len(prefix) :]


# ---------------------------------------------------------------------------- from settings
def storage_options(settings: Settings) -> dict[str, Any]:
    """The s3fs options of ``settings`` (endpoint, region, credentials). Unset credentials
    leave botocore's own chain: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
    ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, an instance role."""
    opts: dict[str, Any] = {}
    if settings.s3_endpoint_url:
        opts["endpoint_url"] = settings.s3_endpoint_url
    if settings.s3_region:
        opts["client_kwargs"] = {"region_name": settings.s3_region}
    if settings.s3_access_key_id is not None and settings.s3_secret_access_key is not None:
        opts["key"] = settings.s3_access_key_id.get_secret_value()
        opts["secret"] = settings.s3_secret_access_key.get_secret_value()
    return opts


def object_store(settings: Settings) -> ObjectStore:
    """The store's root: ``PREFLOOP_STORAGE_URL``, else ``<data_dir>`` on local disk."""
    url = settings.storage_url or os.fspath(settings.data_dir)
    return ObjectStore(
        url,
        storage_options=storage_options(settings),
        cache_dir=Path(settings.data_dir) / ARTIFACT_CACHE_DIRNAME,
    )


def image_store(settings: Settings, *, cache_bytes: int = 0) -> ImageStore:
    """The images: ``<root>/images`` (``<data_dir>/images`` by default)."""
    return ImageStore(object_store(settings).child(IMAGES_PREFIX), cache_bytes=cache_bytes)


def artifact_store(settings: Settings) -> ObjectStore:
    """Version artifacts (adapters, validation grids): ``<root>/models`` (``<data_dir>/models``
    by default, where adapter paths stored in the database are relative to)."""
    return object_store(settings).child(MODELS_PREFIX)


__all__ = [
    "ByteCache",
    "ImageStore",
    "IntegrityError",
    "ObjectStore",
    "UnsafePath",
    "artifact_store",
    "image_store",
    "object_store",
    "sniff_media_type",
    "storage_options",
]
