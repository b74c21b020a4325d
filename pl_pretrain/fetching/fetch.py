"""Sources -> a local file.

`fetch` brings one file from a local folder, an ``http(s)://`` URL or a Hugging Face Hub repo to a
local path, and (when a `savedir` is given) places it there under `save_filename` by the chosen
`LocalStrategy`. The names and their meaning follow SpeechBrain's ``speechbrain.utils.fetching``;
what differs is what can go wrong:

- a file appears at its destination only whole: downloads and copies are written to a temporary
  file beside it and renamed into place, links are replaced atomically;
- each destination is guarded by a file lock, so two processes collecting into one folder do not
  tear each other's files;
- every placed file gets a small record (in ``<savedir>/.pl_pretrain/``) saying where it came from,
  so a changed source or revision is fetched again instead of silently reusing the old file;
- the Hub is reached only through ``huggingface_hub.hf_hub_download`` (cache layout, ETags,
  revisions, tokens, ``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` are its business);
- every failure is a `FetchError` (a `ValueError`) that names the source, the file and the cause.

This module knows nothing about ranks or loadables.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import enum
import hashlib
import http.client
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from collections import namedtuple
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import filelock

from pl_pretrain.errors import ChecksumError, ConfigurationError, FetchError, OfflineError

__all__ = [
    "FetchFrom",
    "FetchSource",
    "LocalStrategy",
    "FetchConfig",
    "Fetched",
    "fetch",
    "fetch_file",
    "guess_source",
    "file_sha256",
    "parse_checksum",
    "check_file_name",
    "redact_url",
    "verify_sha256",
    "RECORD_DIR",
]

logger = logging.getLogger(__name__)

RECORD_DIR = ".pl_pretrain"
"""Name of the folder, inside a collection folder, that holds records, locks and temporary files."""

_CHUNK = 8 * 1024 * 1024
_NET_CHUNK = 1024 * 1024  # smaller reads let the disk write while the network delivers
_LOCK_TIMEOUT_S = 6 * 3600.0


class FetchFrom(enum.Enum):
    """Where a source lives: a local folder, the Hugging Face Hub, or a web address."""

    LOCAL = 1
    HUGGING_FACE = 2
    URI = 3


FetchSource = namedtuple("FetchSource", ["FetchFrom", "path"])
FetchSource.__doc__ = "A source pinned to how it is read: ``FetchSource(FetchFrom.HUGGING_FACE, 'org/repo')``."


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


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def guess_source(source: str | os.PathLike | FetchSource) -> tuple[FetchFrom, str]:
    """Returns ``(FetchFrom, path)`` for a source: a URL, an existing folder, or a Hub repo id.

    ``http://`` and ``https://`` are URLs; an existing directory is local; anything else is taken
    as a Hub repo id. A `FetchSource` is returned as given. Other URL schemes (``file://``,
    ``s3://``) are rejected unless they name an existing folder.
    """
    if isinstance(source, FetchSource):
        fetch_from, path = source
        if not isinstance(fetch_from, FetchFrom):
            raise ConfigurationError(
                f"FetchSource({fetch_from!r}, {path!r}) does not name a FetchFrom.",
                hint="Use FetchFrom.LOCAL, FetchFrom.HUGGING_FACE or FetchFrom.URI.",
            )
        return fetch_from, str(path)
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        return FetchFrom.URI, text
    if pathlib.Path(text).expanduser().is_dir():
        return FetchFrom.LOCAL, text
    if _SCHEME.match(text):
        raise ConfigurationError(
            f"Only http:// and https:// addresses are fetched; '{text}' is neither a web address nor an existing folder.",
            source=text,
            hint="Give a local folder as a plain path, or serve the file over http(s).",
        )
    return FetchFrom.HUGGING_FACE, text


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


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or os.path.isabs(text) or "\\" in text


# --------------------------------------------------------------------------------------------
# Records of what a folder holds
# --------------------------------------------------------------------------------------------


def _record_path(savedir: pathlib.Path, save_filename: str) -> pathlib.Path:
    return savedir / RECORD_DIR / f"{save_filename}.json"


def _read_record(savedir: pathlib.Path, save_filename: str) -> dict[str, Any] | None:
    try:
        return json.loads(_record_path(savedir, save_filename).read_text())
    except (OSError, ValueError):
        return None


def _write_record(savedir: pathlib.Path, save_filename: str, record: dict[str, Any]) -> None:
    path = _record_path(savedir, save_filename)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_record(savedir: pathlib.Path, save_filename: str) -> None:
    _record_path(savedir, save_filename).unlink(missing_ok=True)


def _begin_placing(savedir: pathlib.Path, save_filename: str, source: str) -> None:
    """Marks the destination as being replaced: a process killed before `_finish_placing` leaves a
    file that no record vouches for, so the next run places it again instead of trusting it."""
    try:
        _write_record(savedir, save_filename, {"placing": True})
    except OSError as error:
        raise FetchError(f"Could not write in '{savedir / RECORD_DIR}': {error}", source=source) from error


def _finish_placing(savedir: pathlib.Path, save_filename: str, record: dict[str, Any], source: str) -> None:
    """Writes the record of a file just placed; if that fails, the file goes too (nothing vouches for it)."""
    try:
        _write_record(savedir, save_filename, record)
    except OSError as error:
        (savedir / save_filename).unlink(missing_ok=True)
        raise FetchError(
            f"Could not record '{savedir / save_filename}' in '{savedir / RECORD_DIR}': {error}; the file was removed.",
            source=source,
        ) from error


def _identity(fetch_from: FetchFrom, source: str, filename: str, revision: str | None) -> dict[str, Any]:
    return {
        "fetch_from": fetch_from.name,
        "source": source,
        "filename": filename,
        "revision": revision if fetch_from is FetchFrom.HUGGING_FACE else None,
    }


def _fetched_from_record(record: dict[str, Any], path: pathlib.Path, reused: bool) -> Fetched:
    return Fetched(
        path=path,
        fetch_from=FetchFrom[record["fetch_from"]],
        source=record["source"],
        filename=record["filename"],
        location=record.get("location", ""),
        revision=record.get("revision"),
        commit=record.get("commit"),
        etag=record.get("etag"),
        sha256=record.get("sha256"),
        size=record.get("size", 0),
        reused=reused,
    )


@contextlib.contextmanager
def _locked(savedir: pathlib.Path, save_filename: str) -> Iterator[None]:
    """Holds the cross-process lock of one destination file, and cleans its stale temporary files."""
    lock_path = savedir / RECORD_DIR / f"{save_filename}.lock"
    lock = filelock.FileLock(str(lock_path), timeout=5.0)
    waited = 0.0
    while True:
        try:
            lock.acquire()
            break
        except filelock.Timeout:
            waited += 5.0
            if waited == 5.0:
                logger.info("Waiting for another process that is collecting '%s' (lock %s).", save_filename, lock_path)
            if waited >= _LOCK_TIMEOUT_S:
                raise FetchError(
                    f"Gave up after {waited:.0f} s waiting for the lock {lock_path}, held by another process.",
                    hint="Check for a stuck job collecting into the same folder, or remove the lock file.",
                ) from None
    try:
        # Writers hold this lock, so any temporary file of this destination is left over from a
        # killed process: it is never trusted and can go.
        for stale in savedir.glob(f".{glob_escape(save_filename)}.*.tmp"):
            stale.unlink(missing_ok=True)
        for stale in (savedir / RECORD_DIR).glob(f"hub-{glob_escape(save_filename)}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        lock.release()


def glob_escape(name: str) -> str:
    """Returns `name` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


# --------------------------------------------------------------------------------------------
# Atomic placement
# --------------------------------------------------------------------------------------------


def _tmp_beside(dst: pathlib.Path) -> pathlib.Path:
    return dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")


def _atomic_copy(src: pathlib.Path, dst: pathlib.Path, source: str) -> None:
    tmp = _tmp_beside(dst)
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, _CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except OSError as error:
        raise FetchError(f"Could not copy '{src}' to '{dst}': {error}", source=source) from error
    finally:
        tmp.unlink(missing_ok=True)


_symlink_fallback_warned = False


def _atomic_symlink(target: pathlib.Path, dst: pathlib.Path) -> bool:
    """Points `dst` at `target`; returns False when this filesystem refuses symlinks."""
    tmp = _tmp_beside(dst)
    try:
        os.symlink(target, tmp)
    except (OSError, NotImplementedError) as error:
        global _symlink_fallback_warned
        if not _symlink_fallback_warned:
            _symlink_fallback_warned = True
            warnings.warn(
                f"Could not create a symbolic link in '{dst.parent}' ({error}); "
                "copying files instead (LocalStrategy.COPY). Pass local_strategy=LocalStrategy.COPY to silence this.",
                RuntimeWarning,
                stacklevel=4,
            )
        return False
    try:
        os.replace(tmp, dst)
    finally:
        if tmp.is_symlink():
            tmp.unlink()
    return True


def _place(src: pathlib.Path, dst: pathlib.Path, strategy: LocalStrategy, source: str) -> pathlib.Path:
    """Places `src` at `dst` by `strategy` and returns the path to load."""
    if strategy is LocalStrategy.NO_LINK:
        return src
    src = src.absolute()
    dst = dst.absolute()
    if src == dst:
        if dst.is_symlink() and os.path.realpath(dst) == str(dst):
            raise FetchError(
                f"'{dst}' is a symbolic link that points to itself.",
                source=source,
                hint="Remove it by hand; did you call fetch() with source == savedir?",
            )
        return dst
    if strategy is LocalStrategy.SYMLINK and _atomic_symlink(src, dst):
        return dst
    _atomic_copy(src, dst, source)
    return dst


# --------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    """Returns the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def parse_checksum(checksum: str, *, key: str | None = None) -> str:
    """Returns the hex digest of a ``"sha256:<hex>"`` string; raises on any other form."""
    algo, _, hexdigest = str(checksum).partition(":")
    hexdigest = hexdigest.strip().lower()
    if algo.strip().lower() != "sha256" or not _SHA256.match(hexdigest):
        raise ConfigurationError(
            f"Checksum {checksum!r} is not of the form 'sha256:<64 hex digits>'.",
            key=key,
            hint="Compute it with `sha256sum FILE` or `pl-pretrain inspect FILE`.",
        )
    return hexdigest


# --------------------------------------------------------------------------------------------
# The network: URLs
# --------------------------------------------------------------------------------------------


class _Transient(Exception):
    """A network failure worth retrying."""


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _retrying(what: str, config: FetchConfig, call, *, source: str):
    """Runs `call` until it succeeds, retrying `_Transient` failures `config.retries` times with backoff."""
    attempts = max(0, int(config.retries))
    delay = max(0.0, float(config.backoff))
    for attempt in range(attempts + 1):
        try:
            return call()
        except _Transient as error:
            if attempt == attempts:
                raise FetchError(
                    f"{what} failed {attempts + 1} time{'s' if attempts else ''}; last cause: {error}.",
                    source=source,
                    hint="The server or the network is failing; try again later, or raise FetchConfig(retries=...).",
                ) from error
            logger.warning("%s failed (%s); retrying in %.1f s (%d/%d).", what, error, delay, attempt + 1, attempts)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


def _progress_bar(total: int | None, name: str, enabled: bool | None):
    from huggingface_hub import constants
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = os.isatty(2) and not constants.HF_HUB_DISABLE_PROGRESS_BARS
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not enabled, leave=False)


def _download_url(url: str, dst: pathlib.Path, config: FetchConfig, *, source: str) -> tuple[pathlib.Path, str, int]:
    """Downloads `url` whole into a temporary file beside `dst`; returns (that file, sha256, size).

    The caller renames the file into place (or removes it). Credentials in the address
    (``https://user:pass@host/...``) are sent as a Basic ``Authorization`` header that does not
    follow redirects, and never appear in a message.
    """
    safe_url = redact_url(url)
    request_url, authorization = _split_credentials(url)
    secrets = _url_secrets(url)

    def attempt() -> tuple[pathlib.Path, str, int]:
        tmp = _tmp_beside(dst)
        request = urllib.request.Request(
            request_url, headers={"User-Agent": "pl-pretrain", "Accept-Encoding": "identity"}
        )
        if authorization is not None:
            request.add_unredirected_header("Authorization", authorization)
        done = False
        try:
            with urllib.request.urlopen(request, timeout=config.timeout) as response:
                length = response.headers.get("Content-Length")
                expected = int(length) if length is not None and length.isdigit() else None
                digest = hashlib.sha256()
                size = 0
                with open(tmp, "wb") as out, _progress_bar(expected, dst.name, config.progress) as bar:
                    while chunk := response.read(_NET_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        bar.update(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())
                if expected is not None and size != expected:
                    raise _Transient(
                        f"the connection ended after {size} of the {expected} bytes announced by Content-Length"
                    )
            done = True
            return tmp, digest.hexdigest(), size
        except urllib.error.HTTPError as error:
            if error.code >= 500 or error.code in (408, 429):
                raise _Transient(f"HTTP {error.code} {error.reason}") from None
            hint = {
                404: "Check the address; the server has no such file.",
                401: "The server wants credentials; give them in the address (https://user:token@host/...).",
                403: "The server refuses access to this file.",
            }.get(error.code, "Check the address.")
            raise FetchError(f"HTTP {error.code} {error.reason} for {safe_url}.", source=source, hint=hint) from None
        except TimeoutError:
            raise _Transient(f"timed out: no data for {config.timeout:g} s (FetchConfig(timeout=...))") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise _Transient(f"timed out: no answer for {config.timeout:g} s (FetchConfig(timeout=...))") from None
            raise _Transient(_scrub(f"{type(error).__name__}: {reason}", secrets)) from None
        except OSError as error:
            raise FetchError(f"Could not write '{dst}': {error}", source=source) from error
        finally:
            if not done:
                tmp.unlink(missing_ok=True)

    return _retrying(f"Downloading {safe_url}", config, attempt, source=source)


def _split_credentials(url: str) -> tuple[str, str | None]:
    """Returns (`url` without ``user:pass@``, the Basic ``Authorization`` value for them or None)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    netloc = parts.netloc.rpartition("@")[2]
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), f"Basic {token}"


def _url_secrets(url: str) -> list[str]:
    """Returns the secret pieces of `url` (user, password, secret query values), to scrub from messages."""
    parts = urllib.parse.urlsplit(url)
    found = [parts.username or "", parts.password or ""]
    found += [value for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if _is_secret(name)]
    found = [piece for piece in found if len(piece) >= 3]
    return found + [urllib.parse.quote(piece, safe="") for piece in found]


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


_SECRET_NAME = re.compile(r"token|secret|passw|signature|credential|^sig$|^key$|api.?key|^auth", re.IGNORECASE)


def _is_secret(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def _redact_query(query: str) -> str:
    """Returns a query string with the values of secret-looking parameters replaced by ``***``."""
    pieces = []
    for piece in query.split("&"):
        name, sep, _ = piece.partition("=")
        pieces.append(f"{name}{sep}***" if sep and _is_secret(urllib.parse.unquote_plus(name)) else piece)
    return "&".join(pieces)


def redact_url(url: str) -> str:
    """Returns `url` with credentials and secret query values (token, signature...) masked, fit for logs and errors."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None or parts.password is not None:
        parts = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2])
    if parts.query:
        parts = parts._replace(query=_redact_query(parts.query))
    return urllib.parse.urlunsplit(parts)


def _redact_filename(filename: str) -> str:
    """Returns a URL source's file name (which may end in ``?query``) with secret query values masked."""
    path, sep, query = filename.partition("?")
    return path + sep + _redact_query(query) if sep else filename


def _url_cache_dir(url: str) -> pathlib.Path:
    root = pathlib.Path(os.environ.get("PL_PRETRAIN_CACHE", pathlib.Path.home() / ".cache" / "pl_pretrain"))
    return root.expanduser() / "urls" / hashlib.sha256(url.encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------
# The network: the Hugging Face Hub
# --------------------------------------------------------------------------------------------


def _split_hub_source(source: str) -> tuple[str, str | None]:
    """Returns (repo_id, subfolder) for ``org/repo`` or ``org/repo/sub/dir``."""
    parts = source.strip("/").split("/")
    if len(parts) <= 2:
        return "/".join(parts), None
    return "/".join(parts[:2]), "/".join(parts[2:])


def _hub_download(
    repo_id: str,
    filename: str,
    subfolder: str | None,
    config: FetchConfig,
    *,
    cache_dir: str | pathlib.Path | None,
    source: str,
    local_only: bool,
) -> pathlib.Path:
    import httpx2
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download

    location = f"hub repo '{repo_id}'" + (f" at revision '{config.revision}'" if config.revision else "")
    shown = f"{subfolder}/{filename}" if subfolder else filename

    def attempt() -> pathlib.Path:
        try:
            return pathlib.Path(
                hf_hub_download(
                    repo_id=repo_id,
                    filename=filename,
                    subfolder=subfolder,
                    revision=config.revision,
                    cache_dir=cache_dir,
                    token=config.token,
                    local_files_only=local_only,
                    etag_timeout=config.timeout,
                    library_name="pl-pretrain",
                )
            )
        except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as error:
            raise OfflineError(
                f"'{shown}' from {location} is not in the Hugging Face cache, and the network is off "
                f"(offline: allow_network={config.allow_network}, HF_HUB_OFFLINE={'1' if _offline() else '0'}).",
                source=source,
                hint="Fetch it once with network (for example `pl-pretrain fetch` on a login node), or allow the network.",
            ) from _without_token(error, config)
        except (hf_errors.RemoteEntryNotFoundError, hf_errors.EntryNotFoundError) as error:
            raise FetchError(
                f"File '{shown}' does not exist in {location} (404).",
                source=source,
                hint="Check the file name in `paths`, or the revision.",
            ) from _without_token(error, config)
        except hf_errors.RevisionNotFoundError as error:
            raise FetchError(
                f"Revision '{config.revision}' does not exist in hub repo '{repo_id}' (asked for '{shown}').",
                source=source,
                hint="Check FetchConfig(revision=...).",
            ) from _without_token(error, config)
        except hf_errors.GatedRepoError as error:
            raise FetchError(
                f"Hub repo '{repo_id}' is gated and this token has no access to '{shown}' (HTTP {_status(error)}).",
                source=source,
                hint="Accept the repo's conditions on the Hub, then use a token of that account.",
            ) from _without_token(error, config)
        except hf_errors.RepositoryNotFoundError as error:
            raise FetchError(
                f"Could not fetch '{shown}': hub repo '{repo_id}' was not found, or it is private and the request "
                f"was not authorised (HTTP {_status(error)}).",
                source=source,
                hint="Check the repo id; for a private repo set HF_TOKEN or FetchConfig(token=...).",
            ) from _without_token(error, config)
        except hf_errors.HfHubHTTPError as error:
            status = _status(error)
            if status in (401, 403):
                raise FetchError(
                    f"The Hub refused '{shown}' from {location} (HTTP {status}).",
                    source=source,
                    hint="Set HF_TOKEN or FetchConfig(token=...) to a token that can read this repo.",
                ) from _without_token(error, config)
            if status is None or status >= 500 or status in (408, 429):
                raise _Transient(f"HTTP {status} from the Hub") from _without_token(error, config)
            raise FetchError(
                f"The Hub answered HTTP {status} for '{shown}' from {location}.", source=source
            ) from _without_token(error, config)
        except (httpx2.TransportError, ConnectionError, TimeoutError) as error:
            raise _Transient(f"{type(error).__name__}: {error}") from _without_token(error, config)
        except OSError as error:
            if error.errno is None and "Consistency check failed" in str(error):
                # huggingface_hub got fewer bytes than announced, after its own resumes.
                raise _Transient(f"the download ended early: {str(error).splitlines()[0]}") from None
            raise FetchError(f"Could not store '{shown}' from {location}: {error}", source=source) from error

    return _retrying(f"Downloading '{shown}' from {location}", config, attempt, source=source)


def _status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _without_token(error: BaseException, config: FetchConfig) -> BaseException:
    """Returns `error` with the configured token masked in its message (errors may be logged)."""
    token = config.token if isinstance(config.token, str) else None
    if config.token is None:
        from huggingface_hub import get_token

        token = get_token()  # HF_TOKEN or the stored login
    if token and token in str(error):
        return FetchError(str(error).replace(token, "***"))
    return error


def _hub_provenance(cached: pathlib.Path) -> tuple[str | None, str | None]:
    """Returns (commit, etag) of a file in the Hub cache, read off its ``snapshots/<commit>/`` path."""
    parts = cached.parts
    commit = None
    if "snapshots" in parts:
        index = len(parts) - 1 - parts[::-1].index("snapshots")
        if index + 1 < len(parts):
            commit = parts[index + 1]
    etag = None
    real = pathlib.Path(os.path.realpath(cached))
    if real.parent.name == "blobs":
        etag = real.name
    return commit, etag


# --------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------


def fetch(
    filename: str,
    source: str | os.PathLike | FetchSource,
    savedir: str | os.PathLike | None = None,
    save_filename: str | None = None,
    local_strategy: LocalStrategy = LocalStrategy.SYMLINK,
    fetch_config: FetchConfig | None = None,
) -> pathlib.Path:
    """Returns the local path of `filename` from `source`, fetching and placing it as needed.

    Args:
        filename: the file's name inside the source (may contain ``/`` for a subfolder).
        source: a local folder, an ``http(s)://`` address prefix, a Hub repo id, or a `FetchSource`.
        savedir: the folder to place the file in; ``None`` places nothing (strategy ``NO_LINK``;
            URLs then go to ``$PL_PRETRAIN_CACHE``, default ``~/.cache/pl_pretrain``).
        save_filename: the name inside `savedir` (default: the last part of `filename`).
        local_strategy: how the file is placed in `savedir`, see `LocalStrategy`.
        fetch_config: see `FetchConfig`; ``None`` means ``FetchConfig()``.

    Raises:
        FetchError: (a ``ValueError``) naming the source, the file and the cause.
    """
    return fetch_file(filename, source, savedir, save_filename, local_strategy, fetch_config).path


def fetch_file(
    filename: str,
    source: str | os.PathLike | FetchSource,
    savedir: str | os.PathLike | None = None,
    save_filename: str | None = None,
    local_strategy: LocalStrategy = LocalStrategy.SYMLINK,
    fetch_config: FetchConfig | None = None,
    *,
    sha256: str | None = None,
) -> Fetched:
    """Like `fetch`, but returns the whole `Fetched` record (path, commit, etag, sha256, size).

    When `sha256` (a hex digest) is given, the placed file is verified against it, whether it was
    just fetched or already there; a file that does not match is removed and `ChecksumError` raised.
    """
    config = fetch_config if fetch_config is not None else FetchConfig()
    if not isinstance(local_strategy, LocalStrategy):
        raise ConfigurationError(
            f"local_strategy={local_strategy!r} is not a LocalStrategy.",
            hint="Use LocalStrategy.SYMLINK, COPY, COPY_SKIP_CACHE or NO_LINK.",
        )
    fetch_from, source_text = guess_source(source)
    filename = str(filename)
    if not filename or filename.startswith("/") or ".." in filename.split("/"):
        raise ConfigurationError(
            f"File name {filename!r} must be a relative path inside the source, without '..'.",
            source=source_text,
        )
    default_name = filename.rsplit("/", 1)[-1]
    if fetch_from is FetchFrom.URI:
        default_name = default_name.partition("?")[0]  # a query (?token=...) is not part of the name
    save_filename = check_file_name(save_filename if save_filename is not None else default_name)
    expected = sha256.lower() if sha256 is not None else None

    if savedir is None:
        if fetch_from is FetchFrom.URI:
            url = _join_url(source_text, filename)
            savedir_path = _url_cache_dir(url)
            local_strategy = LocalStrategy.COPY_SKIP_CACHE
        else:
            savedir_path = None
            local_strategy = LocalStrategy.NO_LINK
    else:
        savedir_path = pathlib.Path(savedir).expanduser().absolute()

    if fetch_from is FetchFrom.LOCAL:
        return _fetch_local(source_text, filename, savedir_path, save_filename, local_strategy, config, expected)
    if savedir_path is None or (fetch_from is FetchFrom.HUGGING_FACE and local_strategy is LocalStrategy.NO_LINK):
        return _checked(_fetch_remote_unplaced(fetch_from, source_text, filename, config), expected)
    _make_dirs(savedir_path, source_text if fetch_from is not FetchFrom.URI else redact_url(source_text))
    with _locked(savedir_path, save_filename):
        # Verified under the lock: a bad file is removed before another process can reuse it.
        fetched = _fetch_remote_placed(
            fetch_from, source_text, filename, savedir_path, save_filename, local_strategy, config
        )
        return _checked(fetched, expected)


def _checked(fetched: Fetched, expected: str | None) -> Fetched:
    return fetched if expected is None else verify_sha256(fetched, expected)


def verify_sha256(fetched: Fetched, expected: str, *, rehash: bool = False) -> Fetched:
    """Returns `fetched` with its sha256 set if its file matches `expected`; else removes the file and raises.

    The digest computed while downloading is used for a fresh download; a reused file, or any file
    when `rehash` is True (before loading), is read again. Only files pl_pretrain placed (links and
    copies in the collection folder, Hub cache entries) are removed, never a user's own source file.

    Raises:
        ChecksumError: naming the file, the expected and the actual digest.
    """
    fresh = fetched.sha256 is not None and not fetched.reused and not rehash
    actual = fetched.sha256 if fresh else file_sha256(fetched.path)
    if actual != expected:
        removed = _discard(fetched)
        what = f"'{fetched.path}' changed after it was collected: it" if rehash else f"'{fetched.location}'"
        fate = "the file was removed" if removed else "the file was left in place (it is the source itself)"
        raise ChecksumError(
            f"{what} has sha256 {actual}, but sha256 {expected} was expected; {fate}.",
            source=fetched.source,
            hint="The download is corrupt or the source changed: fetch again, or update the pinned checksum.",
        )
    return dataclasses.replace(fetched, sha256=actual)


def _discard(fetched: Fetched) -> bool:
    """Removes a bad file from wherever pl_pretrain put it; returns False when it is the user's own file."""
    path = fetched.path
    if fetched.fetch_from is FetchFrom.LOCAL and os.path.abspath(path) == os.path.abspath(fetched.location):
        return False  # NO_LINK, or the source folder is the collection folder: the user's file
    if fetched.fetch_from is FetchFrom.HUGGING_FACE:
        # Else the Hub cache would serve the same bad bytes again.
        pointer = pathlib.Path(os.path.join(path.parent, os.readlink(path))) if path.is_symlink() else path
        _remove_hub_entry(pointer)
    path.unlink(missing_ok=True)  # unlink never follows a link: a linked source file stays
    _remove_record(path.parent, path.name)
    return True


def _remove_hub_entry(pointer: pathlib.Path) -> None:
    """Removes a file of the Hub cache: its blob and the ``snapshots/<commit>/`` entry that names it."""
    real = pathlib.Path(os.path.realpath(pointer))
    if real.parent.name == "blobs":
        real.unlink(missing_ok=True)
    if "snapshots" in pointer.parts:
        pointer.unlink(missing_ok=True)


def _join_url(prefix: str, filename: str) -> str:
    """Returns ``prefix/filename`` as a URL; a query on either (``?token=...``) is kept as a query."""
    base, _, prefix_query = prefix.partition("?")
    path, _, file_query = filename.partition("?")
    query = "&".join(part for part in (prefix_query, file_query) if part)
    return base.rstrip("/") + "/" + urllib.parse.quote(path) + (f"?{query}" if query else "")


def _make_dirs(folder: pathlib.Path, source: str) -> None:
    try:
        (folder / RECORD_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FetchError(f"Could not create the folder '{folder}': {error}", source=source) from error


def _fetch_local(
    source: str,
    filename: str,
    savedir: pathlib.Path | None,
    save_filename: str,
    strategy: LocalStrategy,
    config: FetchConfig,
    expected: str | None,
) -> Fetched:
    src = (pathlib.Path(source).expanduser() / filename).absolute()
    if not src.is_file():
        what = "is a folder, not a file" if src.is_dir() else "does not exist"
        raise FetchError(f"Local file '{src}' {what}.", source=source, hint="Check the file name and the folder.")
    identity = _identity(FetchFrom.LOCAL, source, filename, None)
    stat = src.stat()
    size = stat.st_size
    if savedir is None or strategy is LocalStrategy.NO_LINK:
        return _checked(Fetched(src, FetchFrom.LOCAL, source, filename, str(src), size=size), expected)
    _make_dirs(savedir, source)
    dst = savedir / save_filename
    with _locked(savedir, save_filename):
        record = _read_record(savedir, save_filename)
        if (
            not config.overwrite
            and _usable(dst)
            and record is not None
            and _same(record, identity, strategy)
            and record.get("size") == size
            and record.get("mtime_ns") == stat.st_mtime_ns
            # a link must still lead to the source; a copy (SYMLINK fell back to COPY) is checked by size and time
            and (not dst.is_symlink() or os.path.realpath(dst) == os.path.realpath(src))
            and (strategy is not LocalStrategy.SYMLINK or dst.is_symlink() or record.get("linked") is False)
        ):
            return _checked(_fetched_from_record(record, dst, reused=True), expected)
        _begin_placing(savedir, save_filename, source)
        path = _place(src, dst, strategy, source)
        placed = Fetched(path, FetchFrom.LOCAL, source, filename, str(src), size=size)
        record = {**_record_of(placed, identity, strategy), "mtime_ns": stat.st_mtime_ns, "linked": path.is_symlink()}
        _finish_placing(savedir, save_filename, record, source)
        return _checked(placed, expected)


def _fetch_remote_unplaced(fetch_from: FetchFrom, source: str, filename: str, config: FetchConfig) -> Fetched:
    """The Hub with no savedir: the file stays in the Hub cache."""
    repo_id, subfolder = _check_hub_id(source)
    local_only = not config.allow_network or _offline()
    cached = _hub_download(
        repo_id,
        filename,
        subfolder,
        config,
        cache_dir=config.huggingface_cache_dir,
        source=source,
        local_only=local_only,
    )
    return _hub_fetched(cached, source, filename, config, cached)


def _check_hub_id(source: str) -> tuple[str, str | None]:
    if _looks_like_path(source) or not _HUB_ID.match(source):
        raise FetchError(
            f"'{source}' is not an existing folder, and not a Hugging Face Hub repo id ('org/name').",
            source=source,
            hint="Check the folder path (it must exist on this machine), or give a repo id such as 'org/model'.",
        )
    return _split_hub_source(source)


def _hub_fetched(path: pathlib.Path, source: str, filename: str, config: FetchConfig, cached: pathlib.Path) -> Fetched:
    commit, etag = _hub_provenance(cached)
    repo_id, subfolder = _split_hub_source(source)
    shown = f"{subfolder}/{filename}" if subfolder else filename
    location = f"hub:{repo_id}@{commit or config.revision or 'main'}/{shown}"
    sha = _verified_etag(cached, etag, source, location) if etag is not None and _SHA256.match(etag) else None
    return Fetched(
        path,
        FetchFrom.HUGGING_FACE,
        source,
        filename,
        location=location,
        revision=config.revision,
        commit=commit,
        etag=etag,
        sha256=sha,
        size=path.stat().st_size,
    )


def _verified_etag(cached: pathlib.Path, etag: str, source: str, location: str) -> str:
    """The Hub names LFS files by their sha256: returns it once the bytes are checked against it.

    A file that does not match is removed from the Hub cache, so that the next fetch downloads it again.
    """
    actual = file_sha256(cached)
    if actual != etag:
        _remove_hub_entry(cached)
        raise ChecksumError(
            f"'{location}' has sha256 {actual}, but the Hub's ETag says sha256 {etag}; "
            "the file was removed from the Hugging Face cache.",
            source=source,
            hint="The download or the cached copy was corrupt: fetch again.",
        )
    return actual


def _fetch_remote_placed(
    fetch_from: FetchFrom,
    source: str,
    filename: str,
    savedir: pathlib.Path,
    save_filename: str,
    strategy: LocalStrategy,
    config: FetchConfig,
) -> Fetched:
    dst = savedir / save_filename
    uri = fetch_from is FetchFrom.URI
    # What is recorded and shown of a URL never holds its credentials.
    shown_source = redact_url(source) if uri else source
    shown_filename = _redact_filename(filename) if uri else filename
    identity = _identity(fetch_from, shown_source, shown_filename, config.revision)
    record = _read_record(savedir, save_filename)
    network = config.allow_network and not _offline()
    # A file whose size no longer matches its record was cut short or rewritten by something else.
    known = record is not None and _same(record, identity, strategy) and _size_of(dst) == record.get("size")
    if not config.overwrite and _usable(dst) and known:
        hub_update = fetch_from is FetchFrom.HUGGING_FACE and config.allow_updates and network
        if not hub_update:
            return _fetched_from_record(record, dst, reused=True)
    if record is None and _usable(dst) and not config.overwrite:
        # A file put there by hand or by an older tool: SpeechBrain reuses it, and so do we.
        logger.info("Using '%s', which was already there (no record of its source).", dst)
        return Fetched(
            dst,
            fetch_from,
            shown_source,
            shown_filename,
            str(dst),
            revision=config.revision,
            size=dst.stat().st_size,
            reused=True,
        )

    if uri:
        url = _join_url(source, filename)
        if not network:
            raise OfflineError(
                f"'{redact_url(url)}' has not been collected into '{savedir}', and the network is off "
                f"(offline: allow_network={config.allow_network}, HF_HUB_OFFLINE={'1' if _offline() else '0'}).",
                source=shown_source,
                hint="Fetch it once with network (for example `pl-pretrain fetch`), or allow the network.",
            )
        tmp, sha, size = _download_url(url, dst, config, source=shown_source)
        try:
            _begin_placing(savedir, save_filename, shown_source)
            _move(tmp, dst, shown_source)
        finally:
            tmp.unlink(missing_ok=True)
        placed = Fetched(dst, FetchFrom.URI, shown_source, shown_filename, redact_url(url), sha256=sha, size=size)
        _finish_placing(savedir, save_filename, _record_of(placed, identity, strategy), shown_source)
        return placed

    repo_id, subfolder = _check_hub_id(source)
    if strategy is LocalStrategy.COPY_SKIP_CACHE:
        # Download into a private cache inside savedir, then move the blob into place: no second copy.
        scratch = savedir / RECORD_DIR / f"hub-{save_filename}-{uuid.uuid4().hex}"
        try:
            cached = _hub_download(
                repo_id, filename, subfolder, config, cache_dir=scratch, source=source, local_only=not network
            )
            fetched = _hub_fetched(cached, source, filename, config, cached)
            _begin_placing(savedir, save_filename, source)
            _move(pathlib.Path(os.path.realpath(cached)), dst, source)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        placed = dataclasses.replace(fetched, path=dst)
    else:
        cached = _hub_download(
            repo_id,
            filename,
            subfolder,
            config,
            cache_dir=config.huggingface_cache_dir,
            source=source,
            local_only=not network,
        )
        fetched = _hub_fetched(cached, source, filename, config, cached)
        _begin_placing(savedir, save_filename, source)
        placed = dataclasses.replace(fetched, path=_place(cached, dst, strategy, source))
    _finish_placing(savedir, save_filename, _record_of(placed, identity, strategy), source)
    return placed


def _move(src: pathlib.Path, dst: pathlib.Path, source: str) -> None:
    try:
        os.replace(src, dst)
    except OSError as error:
        raise FetchError(f"Could not move the fetched file into place at '{dst}': {error}", source=source) from error


def _size_of(path: pathlib.Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _usable(dst: pathlib.Path) -> bool:
    """True when `dst` is a file, or a link that leads to one."""
    return dst.is_file()


def _same(record: dict[str, Any], identity: dict[str, Any], strategy: LocalStrategy) -> bool:
    return all(record.get(k) == v for k, v in identity.items()) and record.get("strategy") == strategy.name


def _record_of(fetched: Fetched, identity: dict[str, Any], strategy: LocalStrategy) -> dict[str, Any]:
    return {
        **identity,
        "strategy": strategy.name,
        "location": fetched.location,
        "commit": fetched.commit,
        "etag": fetched.etag,
        "sha256": fetched.sha256,
        "size": fetched.size,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
