"""Hugging Face Hub sources: ``hf_hub_download`` wrapped, its errors turned into ours.

The Hub is reached only through ``huggingface_hub.hf_hub_download``: cache layout, ETags,
revisions, tokens, ``HF_HOME``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` are its business. What is ours:
a source may name a subfolder (``FetchSource(FetchFrom.HUGGING_FACE, "org/repo/sub/dir")``: as a
plain text, more than two parts are a local path, see `guess_source`), an LFS file is checked against the sha256
its ETag names, transient failures are retried, and no token appears in an error.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
import shutil
from collections.abc import Callable

from pl_pretrain.errors import ChecksumError, FetchError, OfflineError
from pl_pretrain.fetching.integrity import _is_sha256, _remove_hub_entry, file_sha256
from pl_pretrain.fetching.kinds import Request, SourceKind
from pl_pretrain.fetching.network import (
    ProgressGroup,
    _network_allowed,
    _offline,
    _offline_state,
    _retrying,
    _Transient,
)
from pl_pretrain.fetching.placement import _move, _place, _scratch_dir
from pl_pretrain.fetching.records import _begin_placing, _finish_placing, _identity, _record_of, _reusable
from pl_pretrain.fetching.redaction import _scrub, scrubbed_chain
from pl_pretrain.fetching.sources import FetchConfig, Fetched, FetchFrom, LocalStrategy

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


class HubKind(SourceKind):
    """Hub repos (``org/name``, or ``org/name/sub/dir`` given as a `FetchSource`)."""

    fetch_from = FetchFrom.HUGGING_FACE

    def unplaced(self, request: Request) -> Fetched:
        """The file stays in the Hub cache."""
        config = request.config
        repo_id, subfolder = _check_hub_id(request.source)
        cached = _hub_download(
            repo_id,
            request.filename,
            subfolder,
            config,
            cache_dir=config.huggingface_cache_dir,
            source=request.source,
            local_only=not _network_allowed(config),
            progress=request.progress,
        )
        return _hub_fetched(cached, request.source, request.filename, config)

    def reusable(self, request: Request, *, ask_again: bool = False) -> Fetched | None:
        """`ask_again` (``allow_updates`` with the network on) refuses even a file its record vouches for."""
        assert request.savedir is not None
        config = request.config
        identity = _identity(FetchFrom.HUGGING_FACE, request.source, request.filename, config.revision)
        return _reusable(
            request.savedir, request.save_filename, identity, request.strategy, config, ask_again=ask_again
        )

    def placed(self, request: Request) -> Fetched:
        source, filename, savedir, save_filename = (
            request.source,
            request.filename,
            request.savedir,
            request.save_filename,
        )
        config, strategy = request.config, request.strategy
        assert savedir is not None
        dst = request.destination
        identity = _identity(FetchFrom.HUGGING_FACE, source, filename, config.revision)
        network = _network_allowed(config)
        reused = self.reusable(request, ask_again=config.allow_updates and network)
        if reused is not None:
            return reused
        repo_id, subfolder = _check_hub_id(source)
        if strategy is LocalStrategy.COPY_SKIP_CACHE:
            # Download into a private cache inside savedir, then move the blob into place: no second copy.
            scratch = _scratch_dir(savedir, save_filename)
            try:
                cached = _hub_download(
                    repo_id,
                    filename,
                    subfolder,
                    config,
                    cache_dir=scratch,
                    source=source,
                    local_only=not network,
                    progress=request.progress,
                )
                fetched = _hub_fetched(cached, source, filename, config)
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
                progress=request.progress,
            )
            fetched = _hub_fetched(cached, source, filename, config)
            _begin_placing(savedir, save_filename, source)
            placed = dataclasses.replace(fetched, path=_place(cached, dst, strategy, source))
        _finish_placing(savedir, save_filename, _record_of(placed, identity, strategy), source)
        return placed


KIND = HubKind()


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or os.path.isabs(text) or "\\" in text


def _check_hub_id(source: str) -> tuple[str, str | None]:
    """Returns (repo_id, subfolder) of a Hub source; raises when it is no repo id (a missing folder, say)."""
    if _looks_like_path(source) or not _HUB_ID.match(source):
        raise FetchError(
            f"'{source}' is not an existing folder, and not a Hugging Face Hub repo id ('org/name').",
            source=source,
            hint="Check the folder path (it must exist on this machine), or give a repo id such as 'org/model'.",
        )
    return _split_hub_source(source)


def _split_hub_source(source: str) -> tuple[str, str | None]:
    """Returns (repo_id, subfolder) for ``org/repo`` or ``org/repo/sub/dir``."""
    parts = source.strip("/").split("/")
    if len(parts) <= 2:
        return "/".join(parts), None
    return "/".join(parts[:2]), "/".join(parts[2:])


def _hub_fetched(cached: pathlib.Path, source: str, filename: str, config: FetchConfig) -> Fetched:
    """Returns the `Fetched` of a file in the Hub cache, its LFS bytes checked against their ETag."""
    commit, etag = _hub_provenance(cached)
    repo_id, subfolder = _split_hub_source(source)
    shown = f"{subfolder}/{filename}" if subfolder else filename
    location = f"hub:{repo_id}@{commit or config.revision or 'main'}/{shown}"
    sha = _verified_etag(cached, etag, source, location) if etag is not None and _is_sha256(etag) else None
    return Fetched(
        cached,
        FetchFrom.HUGGING_FACE,
        source,
        filename,
        location=location,
        revision=config.revision,
        commit=commit,
        etag=etag,
        sha256=sha,
        size=cached.stat().st_size,
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


def _hub_download(
    repo_id: str,
    filename: str,
    subfolder: str | None,
    config: FetchConfig,
    *,
    cache_dir: str | pathlib.Path | None,
    source: str,
    local_only: bool,
    progress: ProgressGroup | None = None,
) -> pathlib.Path:
    """Returns the path of the file in the Hub cache, downloading it with retries when needed.

    With the network on, the file's metadata is asked for first (``get_hf_file_metadata``, which
    huggingface_hub does not retry): a failing Hub is then retried by `FetchConfig.retries` and
    reported with its real status, instead of huggingface_hub's own ~25 s of retries ending in
    "check your connection". A file already in the Hub cache is still used when the Hub is down.
    `progress`: a bar shared with files fetched at once, fed through ``hf_hub_download(tqdm_class=)``.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    location = f"hub repo '{repo_id}'" + (f" at revision '{config.revision}'" if config.revision else "")
    shown = f"{subfolder}/{filename}" if subfolder else filename
    secrets = _token_secrets(config)

    def download(local_files_only: bool) -> pathlib.Path:
        return pathlib.Path(
            hf_hub_download(
                repo_id=repo_id,
                filename=filename,
                subfolder=subfolder,
                revision=config.revision,
                cache_dir=cache_dir,
                token=config.token,
                local_files_only=local_files_only,
                etag_timeout=config.timeout,
                library_name="pl-pretrain",
                tqdm_class=None if progress is None else progress.tqdm_class(shown),
            )
        )

    def attempt() -> pathlib.Path:
        # Every failure is translated outside its `except`, so that the raised error carries only
        # the scrubbed copy of its cause, and no `__context__` holding the original (and a token).
        failure: BaseException | None = None
        if not local_only:
            try:
                url = hf_hub_url(repo_id, filename, subfolder=subfolder, revision=config.revision)
                get_hf_file_metadata(url, token=config.token, timeout=config.timeout, library_name="pl-pretrain")
            except Exception as error:
                failure = _translated(error, config, location, shown, repo_id, source, secrets)
            if isinstance(failure, _Transient) and (cached := _cached_copy(download)) is not None:
                logger.warning(
                    "The Hub could not be reached for '%s' from %s (%s); using the copy in the Hugging Face cache.",
                    shown,
                    location,
                    failure,
                )
                return cached
            if failure is not None:
                raise failure
        try:
            return download(local_only)
        except Exception as error:
            failure = _translated(error, config, location, shown, repo_id, source, secrets)
        raise failure

    return _retrying(f"Downloading '{shown}' from {location}", config, attempt, source=source)


def _cached_copy(download: Callable[[bool], pathlib.Path]) -> pathlib.Path | None:
    try:
        return download(True)
    except Exception:
        return None


def _translated(
    error: Exception,
    config: FetchConfig,
    location: str,
    shown: str,
    repo_id: str,
    source: str,
    secrets: list[str],
) -> BaseException:
    """Returns our error for a failure of huggingface_hub, its cause chain scrubbed of every token."""
    import httpx2
    from huggingface_hub import errors as hf_errors

    translated: BaseException
    if isinstance(error, hf_errors.LocalEntryNotFoundError) and not (_offline() or not config.allow_network):
        # The network is on: huggingface_hub keeps the real failure of its metadata request as the cause.
        real = error.__cause__
        if isinstance(real, Exception) and not isinstance(real, hf_errors.LocalEntryNotFoundError):
            return _translated(real, config, location, shown, repo_id, source, secrets)
        translated = FetchError(
            f"Could not fetch '{shown}' from {location}: {_scrub(str(error), secrets)}", source=source
        )
    elif isinstance(error, (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled)):
        translated = OfflineError(
            f"'{shown}' from {location} is not in the Hugging Face cache, and the network is off "
            f"({_offline_state(config)}).",
            source=source,
            hint="Fetch it once with network (for example `pl-pretrain fetch` on a login node), or allow the network.",
        )
    elif isinstance(error, (hf_errors.RemoteEntryNotFoundError, hf_errors.EntryNotFoundError)):
        translated = FetchError(
            f"File '{shown}' does not exist in {location} (404).",
            source=source,
            hint="Check the file name, or the revision.",
        )
    elif isinstance(error, hf_errors.RevisionNotFoundError):
        translated = FetchError(
            f"Revision '{config.revision}' does not exist in hub repo '{repo_id}' (asked for '{shown}').",
            source=source,
            hint="Check FetchConfig(revision=...).",
        )
    elif isinstance(error, hf_errors.GatedRepoError):
        translated = FetchError(
            f"Hub repo '{repo_id}' is gated and this token has no access to '{shown}' (HTTP {_status(error)}).",
            source=source,
            hint="Accept the repo's conditions on the Hub, then use a token of that account.",
        )
    elif isinstance(error, hf_errors.RepositoryNotFoundError):
        translated = FetchError(
            f"Could not fetch '{shown}': hub repo '{repo_id}' was not found, or it is private and the request "
            f"was not authorised (HTTP {_status(error)}).",
            source=source,
            hint="Check the repo id; for a private repo set HF_TOKEN or FetchConfig(token=...).",
        )
    elif isinstance(error, hf_errors.HfHubHTTPError):
        status = _status(error)
        if status in (401, 403):
            translated = FetchError(
                f"The Hub refused '{shown}' from {location} (HTTP {status}).",
                source=source,
                hint="Set HF_TOKEN or FetchConfig(token=...) to a token that can read this repo.",
            )
        elif status is None or status >= 500 or status in (408, 429):
            translated = _Transient(f"HTTP {status} from the Hub")
        else:
            translated = FetchError(f"The Hub answered HTTP {status} for '{shown}' from {location}.", source=source)
    elif isinstance(error, (httpx2.TransportError, ConnectionError, TimeoutError)):
        translated = _Transient(_scrub(f"could not reach the Hub: {type(error).__name__}: {error}", secrets))
    elif isinstance(error, OSError) and error.errno is None and "Consistency check failed" in str(error):
        # huggingface_hub got fewer bytes than announced, after its own resumes.
        translated = _Transient(f"the download ended early: {_scrub(str(error).splitlines()[0], secrets)}")
    elif isinstance(error, OSError):
        translated = FetchError(
            f"Could not store '{shown}' from {location}: {_scrub(str(error), secrets)}", source=source
        )
    else:
        translated = FetchError(
            f"Could not fetch '{shown}' from {location}: {_scrub(f'{type(error).__name__}: {error}', secrets)}",
            source=source,
        )
    translated.__cause__ = scrubbed_chain(error, secrets)
    return translated


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _token_secrets(config: FetchConfig) -> list[str]:
    """Returns the tokens that may be sent (the configured one, or huggingface_hub's default), to scrub from texts."""
    token = config.token if isinstance(config.token, str) else None
    if config.token is None:
        from huggingface_hub import get_token

        token = get_token()  # HF_TOKEN or the stored login
    return [token] if token else []
