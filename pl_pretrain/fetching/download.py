"""One URL download that resumes, respects the server and stays bounded: Range/If-Range, Retry-After, time and size.

The bytes go to a partial file, ``<savedir>/.pl_pretrain/<name>.partial``, beside the record of its
validator (``<name>.partial.json``: the address without secrets, the server's strong ETag or its
Last-Modified, the announced size). A retry, or the next run after a kill, asks for the rest with
``Range: bytes=N-`` guarded by ``If-Range: <validator>``: the server sends the rest (206) only while
the file is the same one, and the whole file otherwise (200), which restarts the partial. Only a
server that says ``Accept-Ranges: bytes`` and gives a validator gets a record; a partial without its
record is never continued (`placement._locked` removes it).

Bounds: ``FetchConfig(max_time=)`` covers the whole file, retries and waits included, and also
a read in progress; the body stops at its ``Content-Length`` and at ``FetchConfig(max_bytes=)``.
429 and 503 wait as their ``Retry-After`` asks (`network._retrying`).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pathlib
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pl_pretrain.errors import FetchError
from pl_pretrain.fetching.network import ProgressGroup, _Deadline, _retry_after, _retrying, _Transient
from pl_pretrain.fetching.placement import _partial_paths
from pl_pretrain.fetching.redaction import _scrub
from pl_pretrain.fetching.sources import FetchConfig

__all__ = ["download"]

_NET_CHUNK = 1024 * 1024  # smaller reads let the disk write while the network delivers
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")


class _Partial:
    """A partial download and the record of why it may be continued."""

    def __init__(self, dst: pathlib.Path) -> None:
        self.path, self.meta = _partial_paths(dst.parent, dst.name)

    def resumable(self, shown_url: str) -> tuple[int, str] | None:
        """Returns (bytes held, validator) when the partial may be continued; otherwise forgets it."""
        try:
            record = json.loads(self.meta.read_text())
            size = self.path.stat().st_size
        except (OSError, ValueError):
            self.discard()
            return None
        total = record.get("total") if isinstance(record, dict) else None
        validator = record.get("validator") if isinstance(record, dict) else None
        if (
            record.get("url") != shown_url
            or not isinstance(validator, str)
            or not validator
            or size == 0
            or (isinstance(total, int) and size >= total)
        ):
            self.discard()
            return None
        return size, validator

    def remember(self, shown_url: str, validator: str, total: int | None) -> None:
        tmp = self.meta.with_name(self.meta.name + ".tmp")
        tmp.write_text(json.dumps({"url": shown_url, "validator": validator, "total": total}))
        os.replace(tmp, self.meta)

    def forget(self) -> None:
        """Drops the record: the partial is no longer to be continued (done, or not resumable)."""
        self.meta.unlink(missing_ok=True)

    def discard(self) -> None:
        self.forget()
        self.path.unlink(missing_ok=True)


def download(
    request_url: str,
    authorization: str | None,
    dst: pathlib.Path,
    config: FetchConfig,
    *,
    shown_url: str,
    source: str,
    secrets: Sequence[str] = (),
    progress: ProgressGroup | None = None,
    check: Callable[[Any], None] | None = None,
) -> tuple[pathlib.Path, str, int]:
    """Downloads `request_url` whole; returns (the finished partial file, its sha256, its size).

    The caller renames the file into place (or removes it). `shown_url` is the address without
    secrets, for messages and the partial's record; `secrets` are masked in any cause shown.
    `progress` is a bar shared with other files (None: a bar of this file's own); `check` may
    refuse an answer by its headers before any byte is kept (raising `FetchError`).
    """
    deadline = _Deadline(config.max_time)
    partial = _Partial(dst)
    deadline.keeps = partial.meta.is_file  # type: ignore[method-assign]
    what = f"Downloading {shown_url}"
    own_bar = progress is None
    bar = ProgressGroup(dst.name, config.progress) if progress is None else progress

    def attempt() -> tuple[pathlib.Path, str, int]:
        resume = partial.resumable(shown_url)
        headers = {"User-Agent": "pl-pretrain", "Accept-Encoding": "identity"}
        if resume is not None:
            headers["Range"] = f"bytes={resume[0]}-"
            headers["If-Range"] = resume[1]
        request = urllib.request.Request(request_url, headers=headers)
        if authorization is not None:
            request.add_unredirected_header("Authorization", authorization)
        received = [resume[0] if resume else 0]
        try:
            with urllib.request.urlopen(request, timeout=deadline.timeout(config.timeout)) as response:
                return _receive(response, resume, received)
        except urllib.error.HTTPError as error:
            if error.code == 416 and resume is not None:
                partial.discard()  # the server no longer has those bytes: start again
                raise _Transient("the server refused to resume the partial file (HTTP 416)", wait=0.0) from None
            if error.code >= 500 or error.code in (408, 429):
                wait = _retry_after(error.headers) if error.code in (429, 503) else None
                asked = f" (Retry-After: {error.headers.get('Retry-After')})" if wait is not None else ""
                raise _Transient(f"HTTP {error.code} {error.reason}{asked}", wait=wait) from None
            partial.discard()
            hint = {
                404: "Check the address; the server has no such file.",
                401: "The server wants credentials; give them in the address (https://user:token@host/...).",
                403: "The server refuses access to this file.",
            }.get(error.code, "Check the address.")
            raise FetchError(f"HTTP {error.code} {error.reason} for {shown_url}.", source=source, hint=hint) from None
        except TimeoutError:
            if deadline.expired():
                raise out_of_time(received[0]) from None
            raise _Transient(f"timed out: no data for {config.timeout:g} s (FetchConfig(timeout=...))") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, (socket.timeout, TimeoutError)):
                if deadline.expired():
                    raise out_of_time(received[0]) from None
                raise _Transient(f"timed out: no answer for {config.timeout:g} s (FetchConfig(timeout=...))") from None
            raise _Transient(_scrub(f"{type(error).__name__}: {reason}", list(secrets))) from None
        except OSError as error:
            # A local write failed (a full disk, a quota): the partial gives its space back, and a
            # file whose last write failed is not one to continue.
            partial.discard()
            raise FetchError(f"Could not write '{partial.path}': {error}", source=source) from error

    def out_of_time(received: int) -> FetchError:
        return deadline.error(what, f"{received} bytes received", source=source)

    def _receive(response: Any, resume: tuple[int, str] | None, received: list[int]) -> tuple[pathlib.Path, str, int]:
        head = response.headers
        if check is not None:
            check(head)
        offset = 0
        if resume is not None and response.status == 206:
            start, total = _content_range(head.get("Content-Range"))
            now = _validator(head)
            if start != resume[0] or (now is not None and now != resume[1]):
                partial.discard()
                raise _Transient(f"the server resumed at byte {start} of another version, not at byte {resume[0]}")
            offset = start
            if total is None:
                total = _length(head)
                total = None if total is None else offset + total
        else:
            total = _length(head)
            ranges = "bytes" in head.get("Accept-Ranges", "").lower()
            validator = _validator(head) if ranges and total is not None else None
            if validator is not None:  # a body of unknown length is never continued: nothing says when it is whole
                partial.remember(shown_url, validator, total)
            else:
                partial.forget()  # bytes nobody can ask about later: never continued after this run
        if config.max_bytes is not None and total is not None and total > config.max_bytes:
            partial.discard()
            raise FetchError(
                f"{shown_url} announces {total} bytes, more than FetchConfig(max_bytes={config.max_bytes}); nothing was kept.",
                source=source,
                hint="Check the address, or raise FetchConfig(max_bytes=...).",
            )
        digest = hashlib.sha256()
        if offset:
            with open(partial.path, "rb") as held:
                while block := held.read(_NET_CHUNK):
                    digest.update(block)
        limit = total if total is not None else config.max_bytes
        size = offset
        sock = _socket_of(response)
        bar.report(dst.name, size, total)
        # Unbuffered: what was received is on disk (in the page cache) at once, so a job killed
        # mid-download leaves every byte it got for the next run to continue from.
        with open(partial.path, "ab" if offset else "wb", buffering=0) as out:
            while True:
                if deadline.expired():
                    raise out_of_time(size)
                if bar.cancelled.is_set():
                    raise FetchError(
                        f"{what} stopped after {size} bytes: another file fetched with it failed.", source=source
                    )
                if sock is not None:
                    sock.settimeout(deadline.timeout(config.timeout))
                chunk = response.read1(_NET_CHUNK)
                if not chunk:
                    break
                if limit is not None and size + len(chunk) > limit:
                    partial.discard()
                    raise FetchError(
                        f"{what}: the body went on past "
                        + (f"its {total} bytes" if total is not None else f"FetchConfig(max_bytes={config.max_bytes})")
                        + "; nothing was kept.",
                        source=source,
                        hint="The server sends more than it should; check the address, or raise FetchConfig(max_bytes=...).",
                    )
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                received[0] = size
                bar.report(dst.name, size, total)
            os.fsync(out.fileno())
        if total is not None and size != total:
            raise _Transient(f"the connection ended after {size} of the {total} bytes announced by Content-Length")
        partial.forget()
        return partial.path, digest.hexdigest(), size

    try:
        return _retrying(what, config, attempt, source=source, deadline=deadline)
    except BaseException:
        if not partial.meta.is_file():
            partial.discard()  # nothing to resume from: no trace
        raise
    finally:
        if own_bar:
            bar.close()


def _length(headers: Mapping[str, str]) -> int | None:
    length = headers.get("Content-Length")
    return int(length) if length is not None and length.strip().isdigit() else None


def _validator(headers: Mapping[str, str]) -> str | None:
    """Returns what ``If-Range`` may carry: a strong ETag, else Last-Modified (weak ETags never match a range)."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified") or None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """Returns (first byte, total size) of a ``Content-Range: bytes a-b/n`` header."""
    match = _CONTENT_RANGE.match((value or "").strip())
    if match is None:
        return None, None
    return int(match.group(1)), None if match.group(3) == "*" else int(match.group(3))


def _socket_of(response: Any) -> socket.socket | None:
    """Returns the socket under a urllib response, so that each read's wait can shrink to the time left.

    urllib offers no public handle on it; without one a read in progress may outlast
    ``max_time`` by up to ``timeout``, which is still bounded.
    """
    raw = getattr(getattr(response, "fp", None), "raw", None)
    sock = getattr(raw, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None
