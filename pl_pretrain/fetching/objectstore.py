"""Object-store sources (``s3://``, ``gs://``, ``az://``, ``abfs://``): the source kind, each object's identity, its cache and its one read.

The backends (s3fs, gcsfs, adlfs, through fsspec) own credentials, endpoints and the wire
protocol; each ecosystem's standard environment works as is (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``...; ``STORAGE_EMULATOR_HOST`` and application-default
credentials; ``AZURE_STORAGE_CONNECTION_STRING`` or an account name and key), and
``FetchConfig(storage_options={...})`` is passed to fsspec for anything else. They are optional:
``pip install 'pl-pretrain[s3]'`` (``[gcs]``, ``[azure]``, ``[cloud]``); nothing imports them
before an object-store source is fetched. What differs between the stores (packages, options,
what their errors mean) is in `stores`.

What is ours, as for every kind:

- identity: the object's ETag and its version (S3 or Azure version id, GCS generation) are
  recorded; a rerun asks only for the object's metadata (one request, no body) and fetches again
  only when the object changed; ``allow_network=False`` makes no request at all;
- one read of the body, streamed by the backend into a temporary file that is renamed into place;
  a remote object has a cache (``$PL_PRETRAIN_CACHE/objects/<scheme>/<bucket>/<prefix>/``) that
  ``SYMLINK`` links to, ``COPY`` copies from and ``NO_LINK`` returns, and that collects a sharded
  checkpoint's shards beside their index;
- faults: 5xx, 408, 429, a dropped connection or a short body are retried within
  ``FetchConfig.retries`` (the S3 and Azure clients' own retries are turned off for that; gcsfs
  keeps its own); 404 and 403 are reported after one request, the latter with what to check;
- no key, secret, token or connection string appears in an error (nor in any exception it holds),
  a log line or a record.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pl_pretrain._constants import cache_root
from pl_pretrain.errors import ConfigurationError, FetchError, OfflineError
from pl_pretrain.fetching.kinds import Request, SourceKind
from pl_pretrain.fetching.network import _network_allowed, _offline_state, _progress_bar, _retrying, _Transient
from pl_pretrain.fetching.placement import _locked, _make_dirs, _move, _place, _tmp_beside
from pl_pretrain.fetching.records import (
    _begin_placing,
    _fetched_from_record,
    _finish_placing,
    _identity,
    _read_record,
    _record_of,
    _reusable,
    _same,
    _size_of,
)
from pl_pretrain.fetching.redaction import _option_secrets, redact_url
from pl_pretrain.fetching.sources import FetchConfig, Fetched, FetchFrom, LocalStrategy
from pl_pretrain.fetching.stores import (
    _BACKENDS,
    _S3,
    SCHEMES,
    _Backend,
    _filesystem,
    _import_backend,
    _translate,
    is_object_url,
)

__all__ = ["SCHEMES", "KIND", "ObjectStoreKind", "is_object_url"]

logger = logging.getLogger(__name__)


class ObjectStoreKind(SourceKind):
    """Objects in S3, Google Cloud Storage and Azure Blob Storage (`FetchFrom.URI` with their schemes)."""

    fetch_from = FetchFrom.URI

    def handles(self, source: str) -> bool:
        return is_object_url(source)

    def shown(self, source: str) -> str:
        return redact_url(source)

    def default_savedir(self, source: str, filename: str) -> pathlib.Path:
        return _Object.of(source, filename).cache_dir

    def check(self, request: Request) -> None:
        obj = _Object.of(request.source, request.filename)
        _import_backend(obj.backend, obj.location)
        if not obj.bucket or not obj.key or obj.key.endswith("/"):
            raise ConfigurationError(
                f"'{obj.location}' does not name an object: give s3://<bucket>/<key> (or gs://, az://).",
                source=self.shown(request.source),
            )

    def unplaced(self, request: Request) -> Fetched:
        """``NO_LINK``: the object's copy in the cache."""
        obj = _Object.of(request.source, request.filename)
        return _cached(obj, request.config)

    def placed(self, request: Request) -> Fetched:
        obj = _Object.of(request.source, request.filename)
        savedir, name, strategy, config = request.savedir, request.save_filename, request.strategy, request.config
        assert savedir is not None
        if savedir == obj.cache_dir:
            # No collection folder: the cache is the destination, and keeps each object under its own name.
            return _into(obj, savedir, name, strategy, config) if name == obj.name else _cached(obj, config)
        if strategy is LocalStrategy.COPY_SKIP_CACHE:
            return _into(obj, savedir, name, strategy, config)
        cached = _cached(obj, config)
        dst = request.destination
        identity = _identity(FetchFrom.URI, obj.shown_source, obj.filename, None)
        record = _read_record(savedir, name)
        if (
            not config.overwrite
            and record is not None
            and dst.is_file()
            and _same(record, identity, strategy)
            and (record.get("etag"), record.get("commit"), record.get("size"))
            == (cached.etag, cached.commit, cached.size)
            # a link must still lead to the cached copy; a copy (SYMLINK fell back to COPY) is checked by size
            and (os.path.realpath(dst) == os.path.realpath(cached.path) or not dst.is_symlink())
            and _size_of(dst) == cached.size
        ):
            return _fetched_from_record(record, dst, reused=cached.reused)
        _begin_placing(savedir, name, obj.shown_source)
        placed = dataclasses.replace(cached, path=_place(cached.path, dst, strategy, obj.shown_source), reused=False)
        _finish_placing(savedir, name, _record_of(placed, identity, strategy), obj.shown_source)
        return placed


KIND = ObjectStoreKind()


# ----------------------------------------------------------------------------------------------
# The object, its cache, its identity
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Object:
    """One object: where it is (scheme, bucket, key) and how it is shown."""

    url: str  # the full address, as given (may hold what redact_url masks)
    scheme: str
    bucket: str
    key: str
    shown_source: str
    filename: str

    @classmethod
    def of(cls, source: str, filename: str) -> _Object:
        url = source.rstrip("/") + "/" + filename.lstrip("/")
        parts = urllib.parse.urlsplit(url)
        bucket = parts.netloc.partition("@")[0]  # abfs://<container>@<account>.dfs.core.windows.net/...
        return cls(url, parts.scheme.lower(), bucket, parts.path.lstrip("/"), redact_url(source), filename)

    @property
    def backend(self) -> _Backend:
        return _BACKENDS[self.scheme]

    @property
    def location(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"

    @property
    def cache_dir(self) -> pathlib.Path:
        """Returns the cache folder of this object's prefix: shards of one checkpoint land side by side."""
        prefix = [part for part in self.key.split("/")[:-1] if part not in ("", ".", "..")]
        return cache_root() / "objects" / self.scheme / self.bucket / pathlib.Path(*prefix)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class _Version:
    """What the store says of an object now: its ETag, its version (id or generation) and its size."""

    etag: str | None
    version: str | None
    size: int


def _cached(obj: _Object, config: FetchConfig) -> Fetched:
    """Returns the object's copy in the cache, fetching it when missing or changed."""
    folder = obj.cache_dir
    _make_dirs(folder, obj.shown_source)
    with _locked(folder, obj.name):
        return _into(obj, folder, obj.name, LocalStrategy.COPY_SKIP_CACHE, config)


def _into(obj: _Object, folder: pathlib.Path, name: str, strategy: LocalStrategy, config: FetchConfig) -> Fetched:
    """Returns the object downloaded to ``folder/name``, reused while its record matches the store; lock held."""
    identity = _identity(FetchFrom.URI, obj.shown_source, obj.filename, None)
    record = _read_record(folder, name)
    dst = folder / name
    known = record is not None and _same(record, identity, strategy) and _size_of(dst) == record.get("size")
    if not _network_allowed(config) or (record is None and not config.overwrite):
        # Offline, what its record vouches for is used without a request; a file put there by
        # hand (no record) is used as is, as SpeechBrain does.
        reused = _reusable(folder, name, identity, strategy, config)
        if reused is not None:
            return reused
        if not _network_allowed(config):
            raise OfflineError(
                f"'{obj.location}' has not been collected into '{folder}', and the network is off "
                f"({_offline_state(config)}).",
                source=obj.shown_source,
                hint="Fetch it once with network (for example `pl-pretrain fetch`), or allow the network.",
            )
    store = _Store(obj, config)
    now = store.version()
    if (
        known
        and record is not None
        and not config.overwrite
        and (record.get("etag"), record.get("commit"), record.get("size")) == (now.etag, now.version, now.size)
    ):
        return _fetched_from_record(record, dst, reused=True)
    tmp = store.download(dst, now)
    try:
        _begin_placing(folder, name, obj.shown_source)
        _move(tmp, dst, obj.shown_source)
    finally:
        tmp.unlink(missing_ok=True)
    placed = Fetched(
        dst,
        FetchFrom.URI,
        obj.shown_source,
        obj.filename,
        obj.location,
        commit=now.version,
        etag=now.etag,
        size=now.size,
    )
    _finish_placing(folder, name, _record_of(placed, identity, strategy), obj.shown_source)
    return placed


# ----------------------------------------------------------------------------------------------
# The store, through fsspec
# ----------------------------------------------------------------------------------------------


class _Store:
    """One object's store: its metadata and its bytes, with our retries and our error messages."""

    def __init__(self, obj: _Object, config: FetchConfig) -> None:
        self.obj = obj
        self.config = config
        self.backend = obj.backend
        self.secrets = _option_secrets(config.storage_options, self.backend.secret_env)
        self._fs: Any = None
        self._path = ""

    def _filesystem(self) -> tuple[Any, str]:
        """Returns (fsspec filesystem, path) for the object."""
        if self._fs is None:
            self._fs = _filesystem(self.backend, self.obj.url, self.config.storage_options, self.config.timeout)
            self._path = f"{self.obj.bucket}/{self.obj.key}"
        return self._fs, self._path

    def version(self) -> _Version:
        """Returns the object's ETag, version and size: one metadata request."""

        def attempt() -> _Version:
            fs, path = self._call(self._filesystem)
            fs.invalidate_cache(path)
            info = self._call(lambda: fs.info(path))
            if info.get("type") == "directory":
                raise FetchError(
                    f"'{self.obj.location}' is a folder (a prefix of other objects), not an object.",
                    source=self.obj.shown_source,
                    hint="Name the checkpoint file itself in `paths`.",
                )
            etag = info.get("ETag") or info.get("etag")
            version = info.get(self.backend.version_field)
            return _Version(str(etag) if etag else None, str(version) if version else None, int(info.get("size") or 0))

        return _retrying(f"Reading the metadata of {self.obj.location}", self.config, attempt, source=self._source)

    def download(self, dst: pathlib.Path, now: _Version) -> pathlib.Path:
        """Downloads the object in one streamed request into a temporary file beside `dst`; returns that file."""
        fs, path = self._call(self._filesystem)
        options = dict(self.backend.single_stream)
        if self.backend is _S3 and now.version:
            options["version_id"] = now.version  # the very version whose identity is recorded

        def attempt() -> pathlib.Path:
            tmp = _tmp_beside(dst)
            done = False
            try:
                with _progress_bar(now.size, dst.name, self.config.progress) as bar:
                    self._call(lambda: fs.get_file(path, str(tmp), callback=_progress(bar), **options))
                size = _size_of(tmp)
                if size != now.size:
                    raise _Transient(f"the transfer ended after {size} of the {now.size} bytes of the object")
                _fsync(tmp, self._source)
                done = True
                return tmp
            finally:
                if not done:
                    tmp.unlink(missing_ok=True)

        return _retrying(f"Downloading {self.obj.location}", self.config, attempt, source=self._source)

    @property
    def _source(self) -> str:
        return self.obj.shown_source

    def _call(self, call: Callable[[], Any]) -> Any:
        """Runs one backend call; its failures become `_Transient` (retried) or `FetchError` (reported)."""
        failure: Exception | None = None
        try:
            return call()
        except (FetchError, ConfigurationError, _Transient):
            raise
        except Exception as error:
            obj = self.obj
            failure = _translate(error, self.backend, obj.location, obj.bucket, obj.key, obj.shown_source, self.secrets)
        # Raised outside the `except`: no `__context__` keeps the backend's error, whose text and
        # frames may hold a secret; its scrubbed copy is the cause (as in `hub`).
        raise failure


def _progress(bar: Any) -> Any:
    """Returns an fsspec callback that moves our progress bar."""
    from fsspec.callbacks import Callback

    class Progress(Callback):
        def call(self, *args: Any, **kwargs: Any) -> None:
            if self.size:
                bar.total = self.size
            bar.update(self.value - bar.n)

    return Progress()


def _fsync(path: pathlib.Path, source: str) -> None:
    try:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as error:
        raise FetchError(f"Could not write '{path}': {error}", source=source) from error
