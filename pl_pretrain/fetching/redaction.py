"""Secrets in addresses: masking credentials and secret query values before anything is shown or stored.

The callback and the Pretrainer use `redact_url` too: no secret reaches an error, a log, a record
or a checkpoint.
"""

from __future__ import annotations

import re
import urllib.parse

__all__ = ["redact_url"]

_SECRET_NAME = re.compile(r"token|secret|passw|signature|credential|^sig$|^key$|api.?key|^auth", re.IGNORECASE)


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


def _redact_query(query: str) -> str:
    """Returns a query string with the values of secret-looking parameters replaced by ``***``."""
    pieces = []
    for piece in query.split("&"):
        name, sep, _ = piece.partition("=")
        pieces.append(f"{name}{sep}***" if sep and _is_secret(urllib.parse.unquote_plus(name)) else piece)
    return "&".join(pieces)


def _is_secret(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def _url_secrets(url: str) -> list[str]:
    """Returns the secret pieces of `url` (user, password, secret query values), to scrub from messages."""
    parts = urllib.parse.urlsplit(url)
    found = [parts.username or "", parts.password or ""]
    found += [value for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if _is_secret(name)]
    found = [piece for piece in found if len(piece) >= 3]
    return found + [urllib.parse.quote(piece, safe="") for piece in found]


def _scrub(text: str, secrets: list[str]) -> str:
    """Returns `text` with every piece of `secrets` replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
