"""The object stores behind fsspec, one per scheme: its package and extra, its options and credentials, what its errors mean.

`objectstore` holds what every store shares (the source kind, identity, the cache, the one
streamed read); this module holds what differs between S3 (s3fs), Google Cloud Storage (gcsfs)
and Azure Blob Storage (adlfs): which package to import and which extra installs it, which
environment variables hold secrets, our timeouts and retries as each backend spells them, the
metadata field that names a version, and how each backend's exceptions become a `_Transient`
(retried) or a `FetchError` that says what to change. Nothing here imports a backend before a
store is used.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from typing import Any

from pl_pretrain.errors import ConfigurationError, FetchError
from pl_pretrain.fetching.network import _Transient
from pl_pretrain.fetching.redaction import _scrub, scrubbed_chain


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


_FILESYSTEMS: dict[tuple[Any, ...], Any] = {}
_FILESYSTEMS_LOCK = threading.Lock()


def _filesystem(backend: _Backend, url: str, storage_options: dict[str, Any] | None, timeout: float) -> Any:
    """Returns the fsspec filesystem for `url`: one per configuration and environment, kept while they stay the same."""
    import fsspec

    options = _options(backend, storage_options, timeout)
    # The environment is part of the key: a backend reads it when it is created.
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))
    key = (backend.protocol, fsspec.utils.tokenize(options), env, os.getpid())
    with _FILESYSTEMS_LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            fs, _ = fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)
            if backend is _S3:
                fs.retries = 1  # s3fs's own retry loop: ours governs (FetchConfig.retries)
            _FILESYSTEMS.clear()  # one is enough: configurations rarely alternate
            _FILESYSTEMS[key] = fs
    return fs


_ENV_PREFIXES = ("AWS_", "AZURE_", "GOOGLE_", "GCSFS_", "STORAGE_EMULATOR_HOST", "CLOUDSDK_")


def _options(backend: _Backend, storage_options: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    """Returns the fsspec options: our timeouts and retries first, the user's storage_options over them."""
    user = dict(storage_options or {})
    timeout = float(timeout)
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


def _translate(
    error: BaseException, backend: _Backend, location: str, bucket: str, key: str, source: str, secrets: list[str]
) -> Exception:
    """Returns our error for a backend's: `_Transient` to retry, or a `FetchError` that says what to change.

    Its cause is a scrubbed copy of `error`'s whole chain (`scrubbed_chain`), never `error` itself:
    the caller raises it outside its ``except`` block, so that no ``__context__`` keeps the original,
    whose text (a server echoing a token, a signed URL) and frames may hold a secret.
    """
    status = _status(error)
    if status is None and backend is _GCS and isinstance(error, OSError) and str(error).startswith("Forbidden"):
        status = 403  # gcsfs turns a 403 into OSError("Forbidden: <url>")
    names = _names(error)
    cause = _scrub(f"{type(error).__name__}: {error}", secrets)
    where = f"{backend.bucket_word} '{bucket}'"
    translated: Exception
    if status == 404 or (status is None and isinstance(error, FileNotFoundError)):
        translated = FetchError(
            f"Object '{key}' does not exist in {backend.name} {where} ({location}: HTTP 404).",
            source=source,
            hint=f"Check the {backend.bucket_word} and the key in `paths` (or default_source).",
        )
    elif status in (401, 403) or (status is None and isinstance(error, PermissionError)) or names & _CREDENTIAL_NAMES:
        said = f"HTTP {status}" if status else cause
        translated = FetchError(
            f"{backend.name} refused to read '{location}' ({said}): the credentials are missing, wrong, "
            f"or may not read {where}.",
            source=source,
            hint=backend.credentials,
        )
    elif status is not None and (status >= 500 or status in (408, 429)):
        translated = _Transient(f"HTTP {status} ({cause})")
    # A cut body's error carries a status of its own (aiohttp: 400): its name is what tells.
    elif names & _TRANSIENT_NAMES or (
        status is None and (isinstance(error, (ConnectionError, TimeoutError)) or "Timeout" in str(names))
    ):
        translated = _Transient(cause)
    else:
        translated = FetchError(
            f"Could not read '{location}' from {backend.name}: {cause}.",
            source=source,
            hint="Check the address and FetchConfig(storage_options=...).",
        )
    translated.__cause__ = scrubbed_chain(error, secrets)
    return translated
