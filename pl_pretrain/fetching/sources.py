"""What a fetch is asked for and what it gives back: source kinds, strategies, config and the checks where they enter.

The names and their meaning follow SpeechBrain's ``speechbrain.utils.fetching``. `as_fetch_config`
and `as_local_strategy` are the one place that checks these types; every entry point calls them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import os
import pathlib
import re
from collections import namedtuple
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from pl_pretrain._constants import RECORD_DIR
from pl_pretrain.errors import ArgumentTypeError, ConfigurationError

__all__ = [
    "FetchFrom",
    "FetchSource",
    "LocalStrategy",
    "FetchConfig",
    "Fetched",
    "guess_source",
    "check_file_name",
    "as_fetch_config",
    "as_local_strategy",
    "as_fetch_source",
]


class FetchFrom(enum.Enum):
    """Where a source lives: a local folder, the Hugging Face Hub, or a web address."""

    LOCAL = 1
    HUGGING_FACE = 2
    URI = 3


FetchSource = namedtuple("FetchSource", ["FetchFrom", "path"])
FetchSource.__doc__ = "A source pinned to how it is read: ``FetchSource(FetchFrom.HUGGING_FACE, 'org/repo')``."


def _hash_by_path(self: Any) -> int:
    return hash(self.path)


def _encode(self: Any, *args: Any, **kwargs: Any) -> bytes:
    return f"{self.path}_{self.FetchFrom}".encode(*args, **kwargs)


# As SpeechBrain's: a source is hashed by its path, and encodes as "<path>_<FetchFrom>" (its
# recipes use sources as dict keys and in file names).
FetchSource.__hash__ = _hash_by_path  # type: ignore[method-assign]
FetchSource.encode = _encode  # type: ignore[attr-defined]


class LocalStrategy(enum.Enum):
    """How a fetched file is placed in the destination folder.

    - ``SYMLINK``: fetch into the cache when remote, then link ``savedir/save_filename`` to it.
    - ``COPY``: fetch into the cache when remote, then copy it to ``savedir/save_filename``.
    - ``COPY_SKIP_CACHE``: fetch straight to ``savedir/save_filename`` without keeping a cached copy.
    - ``NO_LINK``: return the path where the file lives (source folder or cache); write nothing
      into ``savedir`` (URLs, which have no cache of their own, are still downloaded there).
    """

    SYMLINK = 1
    COPY = 2
    COPY_SKIP_CACHE = 3
    NO_LINK = 4


@dataclass(frozen=True)
class FetchConfig:
    """How to fetch: when to reuse files, whether to use the network, and how to reach the Hub.

    Args:
        overwrite: fetch and place the file again even when the destination already holds it.
        allow_updates: for Hub sources, ask the Hub whether the revision moved, even when the
            destination already holds a file from the same source and revision.
        allow_network: when False, only files already collected or cached are used (for the Hub,
            ``local_files_only=True``). ``HF_HUB_OFFLINE=1`` has the same effect.
        token: Hub token. ``None`` is huggingface_hub's default (``HF_TOKEN`` or the stored login),
            ``False`` never sends one, a string is used as is. Never logged.
        revision: Hub revision (branch, tag or commit). Part of a collected file's identity:
            changing it fetches again.
        huggingface_cache_dir: Hub cache folder; ``None`` is huggingface_hub's default (``HF_HOME``).
        retries: how many times a transient network failure (reset, timeout, 5xx, 408, 429, short
            read) is retried, with exponential backoff, before it is reported with its last cause.
            A 4xx answer (404, 401, 403) is never retried.
        timeout: seconds a network connection may stay silent before it counts as failed (for the
            Hub, the metadata request; huggingface_hub's ``HF_HUB_DOWNLOAD_TIMEOUT`` governs its
            file transfer).
        progress: show download progress bars (``None``: only when stderr is a terminal).
        backoff: keyword only; seconds to wait before the first retry, doubled before each next
            one (at most 30 s).
        storage_options: keyword only; options for the object store's fsspec filesystem (``s3://``:
            s3fs, ``gs://``: gcsfs, ``az://``/``abfs://``: adlfs), e.g. ``{"endpoint_url": ...,
            "key": ..., "secret": ...}`` or ``{"anon": True}``. ``None``: each backend's standard
            environment and credentials. Never shown: not in ``repr``, records, errors or logs.
        shown_query: keyword only; names of URL query parameters whose values are not secret
            (say ``("v", "revision")``). Every other query value is masked as ``***`` in errors,
            logs, records, provenance and checkpoints, and so is not part of a collected file's
            identity: a parameter that chooses *which* file is served belongs here, so that
            changing it fetches again.
        max_time: keyword only; seconds one file may take in all, retries and waits included
            (default 6 h; ``None``: no bound). A URL download that runs out is a `FetchError`
            naming ``max_time``; its partial file is kept, so the next run resumes it.
        max_bytes: keyword only; the most bytes one URL download may deliver (``None``: no bound
            but the size the server announces). A body longer than this, or than its
            ``Content-Length``, is a `FetchError` and nothing is kept.
        max_retry_wait: keyword only; the longest wait a server's ``Retry-After`` (on 429 and
            503) is honoured for, in seconds (default 300): a longer ask waits this long.
        parallel_shards: keyword only; how many shards of a sharded checkpoint (``*.index.json``)
            are fetched at a time (default 8; 1 fetches them one by one).

    Raises:
        ConfigurationError: a field of the wrong type or out of range (``retries="many"``).
    """

    overwrite: bool = False
    allow_updates: bool = False
    allow_network: bool = True
    token: bool | str | None = dataclasses.field(default=None, repr=False)
    revision: str | None = None
    huggingface_cache_dir: str | pathlib.Path | None = None
    retries: int = 3
    timeout: float = 60.0
    progress: bool | None = None
    backoff: float = dataclasses.field(default=0.5, kw_only=True)
    storage_options: dict[str, Any] | None = dataclasses.field(default=None, kw_only=True, repr=False, hash=False)
    shown_query: tuple[str, ...] = dataclasses.field(default=(), kw_only=True)
    max_time: float | None = dataclasses.field(default=6 * 3600.0, kw_only=True)
    max_bytes: int | None = dataclasses.field(default=None, kw_only=True)
    max_retry_wait: float = dataclasses.field(default=300.0, kw_only=True)
    parallel_shards: int = dataclasses.field(default=8, kw_only=True)

    def __post_init__(self) -> None:
        _check_fetch_config(self)


@dataclass(frozen=True)
class Fetched:
    """What one fetch produced: the local path and where its bytes came from.

    Attributes:
        path: the local file to load (inside `savedir` unless the strategy is ``NO_LINK``).
        fetch_from: the kind of source.
        source: the source as given (folder, URL prefix, or hub repo id), without credentials.
        filename: the file's name inside the source.
        location: the full place the bytes came from (a path, a URL, or ``hub:repo@rev/file``).
        revision: the Hub revision asked for, if any.
        commit: the Hub commit the file was resolved to, if known.
        etag: the Hub's ETag (a sha256 for LFS files), if known.
        sha256: the file's sha256 when it was computed (downloads and verified files).
        size: the file's size in bytes.
        reused: True when the destination already held this file and nothing was fetched.
    """

    path: pathlib.Path
    fetch_from: FetchFrom
    source: str
    filename: str
    location: str
    revision: str | None = None
    commit: str | None = None
    etag: str | None = None
    sha256: str | None = None
    size: int = 0
    reused: bool = False


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def guess_source(source: str | os.PathLike | FetchSource) -> tuple[FetchFrom, str]:
    """Returns ``(FetchFrom, path)`` for a source: a URL, an existing folder, or a Hub repo id.

    ``http://``, ``https://`` and the object stores' ``s3://``, ``gs://``, ``az://``, ``abfs://``
    are URIs; an existing directory is local; a text that cannot be a Hub repo id is local too
    (its folder is missing: the fetch says "no such local folder" and asks nothing of the network);
    anything else is taken as a Hub repo id ``org/name``. A text cannot be a repo id when it looks
    like a path (``/``, ``./``, ``~``, ``\\``), has more than two ``/``-separated parts, or its
    first part exists here (``data/pretrained`` while ``data/`` exists). A file in a Hub repo's
    subfolder is therefore asked for explicitly: ``FetchSource(FetchFrom.HUGGING_FACE, "org/repo/sub")``.
    A `FetchSource` is returned as given. Other URL schemes (``file://``, ``ftp://``) are rejected
    unless they name an existing folder.
    """
    from pl_pretrain.fetching.objectstore import is_object_url  # its backends are imported only when used

    pinned = as_fetch_source(source)
    if pinned is not None:
        fetch_from, path = pinned
        if not isinstance(fetch_from, FetchFrom):
            raise ConfigurationError(
                f"FetchSource({fetch_from!r}, {path!r}) does not name a FetchFrom.",
                hint="Use FetchFrom.LOCAL, FetchFrom.HUGGING_FACE or FetchFrom.URI.",
            )
        return fetch_from, str(path)
    text = os.fspath(cast("str | os.PathLike[str]", source))
    if text.startswith(("http://", "https://")) or is_object_url(text):
        return FetchFrom.URI, text
    if pathlib.Path(text).expanduser().is_dir():
        return FetchFrom.LOCAL, text
    if _SCHEME.match(text):
        raise ConfigurationError(
            f"Only http:// and https:// addresses and object stores (s3://, gs://, az://, abfs://) are fetched; "
            f"'{text}' is neither one of those nor an existing folder.",
            source=text,
            hint="Give a local folder as a plain path, or serve the file over http(s) or from an object store.",
        )
    if not_a_hub_id(text) is not None:
        return FetchFrom.LOCAL, text
    return FetchFrom.HUGGING_FACE, text


def not_a_hub_id(text: str) -> str | None:
    """Returns why `text` is taken for a local path rather than a Hub repo id, or None when it may be one."""
    parts = text.rstrip("/").split("/")
    if text.startswith(("/", "./", "../", "~")) or os.path.isabs(text) or "\\" in text:
        return "it is written as a path"
    if len(parts) > 2:
        return f"it has {len(parts)} '/'-separated parts, and a Hub repo id has two ('org/name')"
    if len(parts) == 2 and parts[0] and pathlib.Path(parts[0]).expanduser().exists():
        return f"'{parts[0]}' exists here"
    return None


def check_file_name(name: str, *, what: str = "save_filename") -> str:
    """Returns `name` if it is a plain file name that stays inside its folder; raises otherwise."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or os.path.isabs(name)
        or name.startswith(RECORD_DIR)
    ):
        raise ConfigurationError(
            f"{what} {name!r} is not a plain file name: it must not be empty, contain '/' or '\\', "
            f"be '.' or '..', be absolute or start with {RECORD_DIR!r}.",
            hint="Use a name such as 'encoder' or 'encoder.ckpt'; files are always written inside the collection folder.",
        )
    return name


def as_fetch_config(value: Any, *, where: str = "fetch_config") -> FetchConfig:
    """Returns `value` as a `FetchConfig` (``None`` is ``FetchConfig()``); raises on anything else.

    SpeechBrain's ``FetchConfig`` converts by value. Its ``token=True`` ("use the stored login")
    becomes ``None`` (huggingface_hub's default, which also reads ``HF_TOKEN``); ``False`` stays ``False``.
    """
    if value is None:
        return FetchConfig()
    if isinstance(value, FetchConfig):
        return value
    if _is_speechbrains(value, "FetchConfig") and dataclasses.is_dataclass(value):
        fields = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
        if fields.get("token") is True:
            fields["token"] = None
        ours = {field.name for field in dataclasses.fields(FetchConfig)}
        unknown = sorted(set(fields) - ours)
        if unknown:
            raise ArgumentTypeError(
                f"{where}: SpeechBrain's FetchConfig has field(s) {', '.join(unknown)}, which "
                f"{_class_name(FetchConfig)} does not know.",
                hint="Pass pl_pretrain.FetchConfig(...) with the fields you need.",
            )
        return FetchConfig(**fields)
    # The value itself is not shown: a mapping given here may hold a token.
    raise ArgumentTypeError(
        f"{where} is not a FetchConfig: expected {_class_name(FetchConfig)} or {_SPEECHBRAIN}.FetchConfig, "
        f"got {_class_name(type(value))}.",
        hint="Pass pl_pretrain.FetchConfig(...), or leave it unset for the defaults.",
    )


def as_local_strategy(value: Any, *, where: str = "local_strategy") -> LocalStrategy:
    """Returns `value` as a `LocalStrategy` (SpeechBrain's converts by name); raises on anything else."""
    if isinstance(value, LocalStrategy):
        return value
    if _is_speechbrains(value, "LocalStrategy") and value.name in LocalStrategy.__members__:
        return LocalStrategy[value.name]
    raise ArgumentTypeError(
        f"{where}={value!r} is not a LocalStrategy: expected {_class_name(LocalStrategy)} or "
        f"{_SPEECHBRAIN}.LocalStrategy, got {_class_name(type(value))}.",
        hint="Use LocalStrategy.SYMLINK, COPY, COPY_SKIP_CACHE or NO_LINK.",
    )


def _check_fetch_config(config: FetchConfig) -> None:
    """Raises `ConfigurationError` naming the first field of `config` that cannot work."""

    def bad(field: str, expected: str) -> ConfigurationError:
        return ConfigurationError(
            f"FetchConfig({field}={getattr(config, field)!r}) is not valid: {field} must be {expected}.",
            hint=f"Pass FetchConfig({field}=...) as documented in help(pl_pretrain.FetchConfig).",
        )

    for field in ("overwrite", "allow_updates", "allow_network"):
        if not isinstance(getattr(config, field), bool):
            raise bad(field, "True or False")
    if config.storage_options is not None and not isinstance(config.storage_options, Mapping):
        raise ConfigurationError(
            f"FetchConfig(storage_options=...) is a {type(config.storage_options).__name__}, not a mapping.",
            hint="Pass FetchConfig(storage_options={...}) as documented in help(pl_pretrain.FetchConfig).",
        )
    if config.progress is not None and not isinstance(config.progress, bool):
        raise bad("progress", "True, False or None")
    if config.token is not None and not isinstance(config.token, (bool, str)):
        raise bad("token", "None, False or a token string")
    if config.revision is not None and (not isinstance(config.revision, str) or not config.revision):
        raise bad("revision", "None or a branch, tag or commit name")
    if config.huggingface_cache_dir is not None and not isinstance(config.huggingface_cache_dir, (str, os.PathLike)):
        raise bad("huggingface_cache_dir", "None or a folder path")
    if isinstance(config.retries, bool) or not isinstance(config.retries, numbers.Integral) or config.retries < 0:
        raise bad("retries", "a whole number >= 0")
    for field, low in (("timeout", "> 0"), ("backoff", ">= 0")):
        value = getattr(config, field)
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
            or (value <= 0 if low == "> 0" else value < 0)
        ):
            raise bad(field, f"a finite number of seconds {low}")
    shown = config.shown_query
    if isinstance(shown, str) or not isinstance(shown, (tuple, list)) or not all(isinstance(n, str) for n in shown):
        raise bad("shown_query", 'a tuple of query parameter names, such as ("v",)')
    object.__setattr__(config, "shown_query", tuple(shown))  # a list is accepted, and frozen
    _check_download_limits(config)


def as_fetch_source(value: Any) -> FetchSource | None:
    """Returns `value` as a `FetchSource` when it is one (ours or SpeechBrain's), else None."""
    if not (isinstance(value, FetchSource) or _is_speechbrains(value, "FetchSource")):
        return None
    fetch_from, path = value
    if _is_speechbrains(fetch_from, "FetchFrom") and fetch_from.name in FetchFrom.__members__:
        fetch_from = FetchFrom[fetch_from.name]
    return value if isinstance(value, FetchSource) and fetch_from is value[0] else FetchSource(fetch_from, path)


# SpeechBrain's fetching types are accepted wherever ours are, converted by value: its
# ``Pretrained.from_hparams`` passes its own LocalStrategy and FetchConfig to our Pretrainer.
_SPEECHBRAIN = "speechbrain.utils.fetching"


def _is_speechbrains(value: Any, name: str) -> bool:
    cls = type(value)
    return cls.__module__ == _SPEECHBRAIN and cls.__qualname__ == name


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_download_limits(config: FetchConfig) -> None:
    """Raises `ConfigurationError` naming the first bound of `config` (time, size, waits, shards) that cannot work."""

    def number(field: str, *, whole: bool, optional: bool, low: float, what: str) -> None:
        value = getattr(config, field)
        if value is None and optional:
            return
        kind = numbers.Integral if whole else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value < low:
            raise ConfigurationError(
                f"FetchConfig({field}={value!r}) is not valid: {field} must be {what}"
                + (" or None." if optional else "."),
                hint=f"Pass FetchConfig({field}=...) as documented in help(pl_pretrain.FetchConfig).",
            )

    number("max_time", whole=False, optional=True, low=1e-9, what="a finite number of seconds > 0")
    number("max_bytes", whole=True, optional=True, low=0, what="a whole number of bytes >= 0")
    number("max_retry_wait", whole=False, optional=False, low=0, what="a finite number of seconds >= 0")
    number("parallel_shards", whole=True, optional=False, low=1, what="a whole number >= 1")
