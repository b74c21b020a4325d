"""``http(s)://`` sources: a file downloaded whole (`download`: resumed, bounded), credentials sent but never shown.

A URL has no cache of its own: with no `savedir` the file is downloaded to
``$PL_PRETRAIN_CACHE/urls/<hash of the address>/``, and ``NO_LINK`` still downloads into `savedir`.
Credentials in the address (``https://user:pass@host/...``) become a Basic ``Authorization``
header that does not follow redirects; what is shown or recorded of an address is redacted.
"""

from __future__ import annotations

import base64
import hashlib
import pathlib
import urllib.parse
from typing import Any

from pl_pretrain._constants import cache_root
from pl_pretrain.errors import ConfigurationError, FetchError, OfflineError
from pl_pretrain.fetching.download import download
from pl_pretrain.fetching.kinds import Request, SourceKind
from pl_pretrain.fetching.network import ProgressGroup, _network_allowed, _offline_state
from pl_pretrain.fetching.placement import _move
from pl_pretrain.fetching.records import _begin_placing, _finish_placing, _identity, _record_of, _reusable
from pl_pretrain.fetching.redaction import _redact_filename, _url_secrets, redact_url, unescaped_password
from pl_pretrain.fetching.sources import FetchConfig, Fetched, FetchFrom


class HttpKind(SourceKind):
    """Web addresses; the kind every `FetchFrom.URI` source falls back to."""

    fetch_from = FetchFrom.URI

    def shown(self, source: str) -> str:
        return redact_url(source)

    def check(self, request: Request) -> None:
        url = _join_url(request.source, request.filename)
        if unescaped_password(url):
            shown = redact_url(url)
            raise ConfigurationError(
                f"The address '{shown}' holds a password with an unescaped '#', '/' or '?', which would end "
                "its host part early (and send the password as a path); nothing was requested.",
                source=redact_url(request.source),
                hint="Percent-encode those characters in the password ('#' as %23, '/' as %2F, '?' as %3F), "
                "for example with urllib.parse.quote(password, safe='').",
            )

    def default_name(self, filename: str) -> str:
        return super().default_name(filename).partition("?")[0]  # a query (?token=...) is not part of the name

    def default_savedir(self, source: str, filename: str) -> pathlib.Path:
        return _url_cache_dir(_join_url(source, filename))

    def reusable(self, request: Request) -> Fetched | None:
        assert request.savedir is not None
        identity = _url_identity(request)
        return _reusable(request.savedir, request.save_filename, identity, request.strategy, request.config)

    def placed(self, request: Request) -> Fetched:
        savedir, save_filename, config = request.savedir, request.save_filename, request.config
        assert savedir is not None
        dst = request.destination
        shown_source = redact_url(request.source, config.shown_query)
        shown_filename = _redact_filename(request.filename, config.shown_query)
        identity = _url_identity(request)
        reused = self.reusable(request)
        if reused is not None:
            return reused
        url = _join_url(request.source, request.filename)
        if not _network_allowed(config):
            raise OfflineError(
                f"'{redact_url(url, config.shown_query)}' has not been collected into '{savedir}', and the network is off "
                f"({_offline_state(config)}).",
                source=shown_source,
                hint="Fetch it once with network (for example `pl-pretrain fetch`), or allow the network.",
            )
        tmp, sha, size = _download_url(url, dst, config, source=shown_source, progress=request.progress)
        try:
            _begin_placing(savedir, save_filename, shown_source)
            _move(tmp, dst, shown_source)
        finally:
            tmp.unlink(missing_ok=True)
        location = redact_url(url, config.shown_query)
        placed = Fetched(dst, FetchFrom.URI, shown_source, shown_filename, location, sha256=sha, size=size)
        _finish_placing(savedir, save_filename, _record_of(placed, identity, request.strategy), shown_source)
        return placed


KIND = HttpKind()


def _url_identity(request: Request) -> dict[str, Any]:
    """Returns what makes two URL fetches the same file: the address without its credentials and secret query values."""
    config = request.config
    shown_source = redact_url(request.source, config.shown_query)
    shown_filename = _redact_filename(request.filename, config.shown_query)
    return _identity(FetchFrom.URI, shown_source, shown_filename, config.revision)


def _join_url(prefix: str, filename: str) -> str:
    """Returns ``prefix/filename`` as a URL; a query on either (``?token=...``) is kept as a query."""
    base, _, prefix_query = prefix.partition("?")
    path, _, file_query = filename.partition("?")
    query = "&".join(part for part in (prefix_query, file_query) if part)
    return base.rstrip("/") + "/" + urllib.parse.quote(path) + (f"?{query}" if query else "")


def _url_cache_dir(url: str) -> pathlib.Path:
    return cache_root() / "urls" / hashlib.sha256(url.encode()).hexdigest()[:24]


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


def _check_body_kind(headers: Any, safe_url: str, source: str) -> None:
    """Refuses a body that is not the file's bytes as they are: compressed, or an HTML page.

    Bytes are stored as served and never decoded, so a ``Content-Encoding`` other than identity
    (sent despite ``Accept-Encoding: identity``) would be stored compressed; an HTML page answered
    with 200 is a login or error page, not a checkpoint.
    """
    encoding = (headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise FetchError(
            f"{safe_url} was sent with Content-Encoding: {encoding}, although identity was asked for; "
            "its bytes would not be the file's.",
            source=source,
            hint="Serve the file uncompressed (a server or proxy compresses it), or fetch and decompress it "
            "yourself and give the local path.",
        )
    if headers.get_content_type() in ("text/html", "application/xhtml+xml"):
        raise FetchError(
            f"{safe_url} answered with an HTML page (Content-Type: {headers.get_content_type()}), not the file: "
            "a login or error page.",
            source=source,
            hint="Check the address; if the server needs a login, give credentials in the address "
            "(https://user:token@host/...).",
        )


def _download_url(
    url: str, dst: pathlib.Path, config: FetchConfig, *, source: str, progress: ProgressGroup | None = None
) -> tuple[pathlib.Path, str, int]:
    """Downloads `url` whole into a partial file beside `dst`; returns (that file, sha256, size).

    The caller renames the file into place (or removes it). Resumes, Retry-After and the bounds
    on time and size are `download`'s.
    """
    request_url, authorization = _split_credentials(url)
    shown_url = redact_url(url, config.shown_query)
    return download(
        request_url,
        authorization,
        dst,
        config,
        shown_url=shown_url,
        source=source,
        secrets=_url_secrets(url, config.shown_query),
        progress=progress,
        check=lambda headers: _check_body_kind(headers, shown_url, source),
    )
