"""Object-store sources: ``s3://``, ``gs://``, ``az://`` and ``abfs://`` read through fsspec (s3fs, gcsfs, adlfs).

The backends own credentials, endpoints and the wire protocol; each ecosystem's standard
environment works as is (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``...;
``STORAGE_EMULATOR_HOST`` and application-default credentials; ``AZURE_STORAGE_CONNECTION_STRING``
or an account name and key), and ``FetchConfig(storage_options={...})`` is passed to fsspec for
anything else. They are optional: ``pip install 'pl-pretrain[s3]'`` (``[gcs]``, ``[azure]``,
``[cloud]``); nothing here imports them before an object-store source is fetched.

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
import importlib
import logging
import os
import pathlib
import threading
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
from pl_pretrain.fetching.redaction import _option_secrets, _scrub, redact_url, scrubbed_chain
from pl_pretrain.fetching.sources import FetchConfig, Fetched, FetchFrom, LocalStrategy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Backend:
    """What differs between the stores: the package, the extra, and how each names its errors and versions."""

    name: str  # for messages: "S3", "Google Cloud Storage", "Azure Blob Storage"
    protocol: str  # fsspec's protocol
    package: str  # the fsspec backend's module
    extra: str  # pip install 'pl-pretrain[<extra>]'
    bucket_word: str  # "bucket" or "container"
    credentials: str  # what to check after a 403
    secret_env: tuple[str, ...]  # environment variables whose values are secrets
    single_stream: dict[str, Any]  # get_file options for one request per object
    version_field: str  # the metadata field that names the object's version


_S3 = _Backend(
    "S3",
    "s3",
    "s3fs",
    "s3",
    "bucket",
    "Check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, AWS_SESSION_TOKEN), or pass "
    "FetchConfig(storage_options={'key': ..., 'secret': ...}); for a public bucket, storage_options={'anon': True}.",
    ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"),
    {"max_concurrency": 1},
    "VersionId",
)
_GCS = _Backend(
    "Google Cloud Storage",
    "gcs",
    "gcsfs",
    "gcs",
    "bucket",
    "Check the application-default credentials (GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth "
    "application-default login`) or pass FetchConfig(storage_options={'token': ...}); for a public bucket, "
    "storage_options={'token': 'anon'}.",
    (),
    {"concurrency": 1},
    "generation",
)
_AZURE = _Backend(
    "Azure Blob Storage",
    "abfs",
    "adlfs",
    "azure",
    "container",
    "Check AZURE_STORAGE_CONNECTION_STRING (or AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or "
    "AZURE_STORAGE_SAS_TOKEN), or pass FetchConfig(storage_options={'account_name': ..., 'account_key': ...}).",
    (
        "AZURE_STORAGE_CONNECTION_STRING",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_SAS_TOKEN",
        "AZURE_STORAGE_CLIENT_SECRET",
        "AZURE_CLIENT_SECRET",
    ),
    {"max_concurrency": 1},
    "version_id",
)
_BACKENDS = {"s3": _S3, "s3a": _S3, "gs": _GCS, "gcs": _GCS, "az": _AZURE, "abfs": _AZURE, "abfss": _AZURE}
SCHEMES = tuple(f"{scheme}://" for scheme in _BACKENDS)
"""The address prefixes this kind reads."""


def is_object_url(text: str) -> bool:
    """True when `text` is an object-store address (``s3://``, ``gs://``, ``az://``, ``abfs://``...)."""
    return text.lower().startswith(SCHEMES)


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


def _import_backend(backend: _Backend, location: str) -> Any:
    try:
        importlib.import_module("fsspec")
        return importlib.import_module(backend.package)
    except ImportError as error:
        raise ConfigurationError(
            f"'{location}' is a {backend.name} address, but the package '{backend.package}' is not installed "
            f"({error}).",
            source=location,
            hint=f"pip install 'pl-pretrain[{backend.extra}]' (or 'pl-pretrain[cloud]' for every object store).",
        ) from None


_FILESYSTEMS: dict[tuple[Any, ...], Any] = {}
_FILESYSTEMS_LOCK = threading.Lock()


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
        """Returns (fsspec filesystem, path) for the object; one filesystem per configuration and environment."""
        if self._fs is None:
            import fsspec

            options = _options(self.backend, self.config)
            # The environment is part of the key: a backend reads it when it is created.
            env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))
            key = (self.backend.protocol, fsspec.utils.tokenize(options), env, os.getpid())
            with _FILESYSTEMS_LOCK:
                fs = _FILESYSTEMS.get(key)
                if fs is None:
                    fs, _ = fsspec.core.url_to_fs(self.obj.url, skip_instance_cache=True, **options)
                    if self.backend is _S3:
                        fs.retries = 1  # s3fs's own retry loop: ours governs (FetchConfig.retries)
                    _FILESYSTEMS.clear()  # one is enough: configurations rarely alternate
                    _FILESYSTEMS[key] = fs
            self._fs = fs
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
            failure = _translate(error, self.obj, self.backend, self.secrets)
            failure.__cause__ = scrubbed_chain(error, self.secrets)
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


_ENV_PREFIXES = ("AWS_", "AZURE_", "GOOGLE_", "GCSFS_", "STORAGE_EMULATOR_HOST", "CLOUDSDK_")


def _options(backend: _Backend, config: FetchConfig) -> dict[str, Any]:
    """Returns the fsspec options: our timeouts and retries first, the user's storage_options over them."""
    user = dict(config.storage_options or {})
    timeout = float(config.timeout)
    if backend is _S3:
        # botocore retries throttling and 5xx itself: one attempt each, so that FetchConfig.retries governs.
        ours = {"retries": {"total_max_attempts": 1}, "connect_timeout": timeout, "read_timeout": timeout}
        user["config_kwargs"] = {**ours, **dict(user.get("config_kwargs") or {})}
    elif backend is _GCS:
        user.setdefault("requests_timeout", timeout)
    else:
        user.setdefault("connection_timeout", int(timeout))
        user.setdefault("read_timeout", int(timeout))
    return user


# ----------------------------------------------------------------------------------------------
# Errors, without secrets
# ----------------------------------------------------------------------------------------------

# fmt: off
_TRANSIENT_NAMES = {
    "ClientPayloadError", "ServerDisconnectedError", "ClientConnectorError", "ClientOSError",
    "ServerTimeoutError", "EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError",
    "ReadTimeoutError", "ResponseStreamingError", "IncompleteRead", "IncompleteReadError",
    "ServiceRequestError", "ServiceResponseError", "ChecksumError",
}
_CREDENTIAL_NAMES = {
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "DefaultCredentialsError",
    "RefreshError", "ClientAuthenticationError", "NoAuthTokenError",
}
# fmt: on


def _status(error: BaseException) -> int | None:
    """Returns the HTTP status an error of any backend carries (botocore, aiohttp, gcsfs, azure-core)."""
    seen = 0
    current: BaseException | None = error
    while current is not None and seen < 8:
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(code, int):
                return code
        for attr in ("status_code", "status", "code"):
            value = getattr(current, attr, None)
            if isinstance(value, int) and 100 <= value < 600:
                return value
        current = current.__cause__ or current.__context__
        seen += 1
    return None


def _names(error: BaseException) -> set[str]:
    names: set[str] = set()
    current: BaseException | None = error
    for _ in range(8):
        if current is None:
            break
        names.update(cls.__name__ for cls in type(current).__mro__)
        current = current.__cause__ or current.__context__
    return names


def _translate(error: BaseException, obj: _Object, backend: _Backend, secrets: list[str]) -> Exception:
    """Returns our error for a backend's: `_Transient` to retry, or a `FetchError` that says what to change."""
    status = _status(error)
    if status is None and backend is _GCS and isinstance(error, OSError) and str(error).startswith("Forbidden"):
        status = 403  # gcsfs turns a 403 into OSError("Forbidden: <url>")
    names = _names(error)
    cause = _scrub(f"{type(error).__name__}: {error}", secrets)
    where = f"{backend.bucket_word} '{obj.bucket}'"
    if status == 404 or (status is None and isinstance(error, FileNotFoundError)):
        return FetchError(
            f"Object '{obj.key}' does not exist in {backend.name} {where} ({obj.location}: HTTP 404).",
            source=obj.shown_source,
            hint=f"Check the {backend.bucket_word} and the key in `paths` (or default_source).",
        )
    if status in (401, 403) or (status is None and isinstance(error, PermissionError)) or names & _CREDENTIAL_NAMES:
        said = f"HTTP {status}" if status else cause
        return FetchError(
            f"{backend.name} refused to read '{obj.location}' ({said}): the credentials are missing, wrong, "
            f"or may not read {where}.",
            source=obj.shown_source,
            hint=backend.credentials,
        )
    if status is not None and (status >= 500 or status in (408, 429)):
        return _Transient(f"HTTP {status} ({cause})")
    # A cut body's error carries a status of its own (aiohttp: 400): its name is what tells.
    if names & _TRANSIENT_NAMES or (
        status is None and (isinstance(error, (ConnectionError, TimeoutError)) or "Timeout" in str(names))
    ):
        return _Transient(cause)
    return FetchError(
        f"Could not read '{obj.location}' from {backend.name}: {cause}.",
        source=obj.shown_source,
        hint="Check the address and FetchConfig(storage_options=...).",
    )
