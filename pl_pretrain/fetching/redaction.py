"""Secrets in addresses and error texts: masked before anything is shown, logged or stored.

What is masked in an address: everything up to the last ``@`` of its authority (user and
password), and the value of **every** query parameter (``?sig=***&v=***``; the names are kept),
because no list of secret-looking names is complete (``pwd``, ``access_key``, ``X-Amz-Signature``...).
A parameter the user declares not secret (``FetchConfig(shown_query=("v",))``) keeps its value.
A password holding an unescaped ``#``, ``/`` or ``?`` ends the authority early, so such an address
is refused before any request (`unescaped_password`), and masked as far as its last plausible ``@``.

The callback and the Pretrainer use `redact_url` too: no secret reaches an error, a log, a record
or a checkpoint. `scrubbed_chain` does the same for an exception and every cause behind it.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["redact_url"]

_MASK = "***"
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%-]+)(:\d*)?$")
# Names of options that hold secrets (object stores' storage_options); query values are all masked, whatever their name.
_SECRET_NAME = re.compile(r"token|secret|passw|signature|credential|^sig$|key|^auth|sas", re.IGNORECASE)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")


def redact_url(url: str, shown_query: Iterable[str] = ()) -> str:
    """Returns `url` fit for logs, errors and records: credentials and query values masked.

    Args:
        url: an address, possibly with ``user:password@`` and a query.
        shown_query: names of query parameters whose values are not secret and are kept.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _redact_filename(url, shown_query)
    end = _authority_end(rest)
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        authority = f"{_MASK}@" + authority.rpartition("@")[2]
    elif (at := _misplaced_at(rest)) is not None:
        end = at + 1 + _authority_end(rest[at + 1 :])
        authority, tail = f"{_MASK}{rest[at:end]}", rest[end:]
    return f"{scheme}://{authority}{_redact_filename(tail, shown_query)}"


def unescaped_password(url: str) -> bool:
    """True when `url`'s credentials hold an unescaped ``#``, ``/`` or ``?``, which would cut its authority short.

    ``https://user:pa/ss@host/f`` parses as host ``user``, port ``pa``: the password would be sent as
    a path, and shown by every error about the "nonnumeric port".
    """
    scheme, sep, rest = url.partition("://")
    return bool(sep) and _misplaced_at(rest) is not None


def _authority_end(rest: str) -> int:
    found = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    return min(found) if found else len(rest)


def _misplaced_at(rest: str) -> int | None:
    """Returns the index of the ``@`` that really ends the credentials when the parsed authority
    (up to the first ``/?#``) has none but looks like ``user:pa`` followed by ``...@host``; else None."""
    end = _authority_end(rest)
    authority = rest[:end]
    if "@" in authority or "@" not in rest[end:]:
        return None
    _, colon, port = authority.partition(":")
    if not colon or port.isdigit():
        return None  # a host (and port) with an '@' in the path (…/model@v1/…): a normal address
    # The last '@' after which a host name follows: everything before it may be the credentials.
    # (Masking too much is safe; showing a piece of a password is not.)
    best = None
    for i, char in enumerate(rest):
        if char == "@" and _HOST.match(rest[i + 1 : i + 1 + _authority_end(rest[i + 1 :])]):
            best = i
    return best


def _redact_filename(text: str, shown_query: Iterable[str] = ()) -> str:
    """Returns a path that may end in ``?query`` (a URL's file name) with its query values masked."""
    path, sep, query = text.partition("?")
    if not sep:
        return text
    query, hash_sep, fragment = query.partition("#")
    return path + sep + _redact_query(query, shown_query) + hash_sep + fragment


def _redact_query(query: str, shown_query: Iterable[str] = ()) -> str:
    """Returns a query string with every value masked, except those of the `shown_query` names."""
    shown = set(shown_query)
    pieces = []
    for piece in query.split("&"):
        name, sep, value = piece.partition("=")
        keep = not sep or not value or urllib.parse.unquote_plus(name) in shown
        pieces.append(piece if keep else f"{name}={_MASK}")
    return "&".join(pieces)


def _is_secret(name: str) -> bool:
    """True when an option named `name` (a storage option, say) looks like it holds a secret."""
    return bool(_SECRET_NAME.search(name))


def _url_secrets(url: str, shown_query: Iterable[str] = ()) -> list[str]:
    """Returns the secret pieces of `url` (credentials, query values), to scrub from messages."""
    scheme, sep, rest = url.partition("://")
    found: list[str] = []
    if sep:
        at = rest[: _authority_end(rest)].rfind("@")
        misplaced = _misplaced_at(rest)
        credentials = rest[:at] if at >= 0 else (rest[:misplaced] if misplaced is not None else "")
        found += [credentials, *credentials.split(":", 1)]
    shown = set(shown_query)
    query = url.partition("?")[2].partition("#")[0]
    found += [value for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True) if name not in shown]
    found = [piece for piece in found if len(piece) >= 3]
    found += [urllib.parse.quote(piece, safe="") for piece in found]
    # Longest first: a password that contains the user name is masked whole.
    return sorted(set(found), key=len, reverse=True)


def _scrub(text: str, secrets: Iterable[str]) -> str:
    """Returns `text` with every piece of `secrets`, and any ``Bearer``/``Basic`` credential, replaced by ``***``."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, _MASK)
    return _BEARER.sub(lambda m: f"{m.group(1)} {_MASK}", text)


class ScrubbedCause(Exception):
    """Stands in for an exception whose text may hold a secret: its type name and its scrubbed text."""


def scrubbed_chain(error: BaseException, secrets: Iterable[str]) -> ScrubbedCause:
    """Returns a copy of `error` and every exception behind it (``__cause__``, ``__context__``), texts scrubbed.

    The copies carry no traceback and no reference to the originals (whose frames and attributes,
    a response's headers say, may hold the secret), so printing the chain shows no secret.
    """
    secrets = list(secrets)
    seen: set[int] = set()
    links: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(links) < 16:
        seen.add(id(current))
        links.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    copies = [ScrubbedCause(_scrub(f"{type(link).__name__}: {link}", secrets)) for link in links]
    for copy, behind in zip(copies, copies[1:], strict=False):
        copy.__cause__ = behind
    return copies[0]


_SECRET_OPTION = re.compile(r"secret|token|passw|credential|connection_string|account_key|sas|^key$", re.IGNORECASE)
_CONNECTION_SECRET = re.compile(r"(?:AccountKey|SharedAccessSignature)=([^;]+)", re.IGNORECASE)


def _option_secrets(options: Mapping[str, Any] | None, env_names: Iterable[str] = ()) -> list[str]:
    """Returns the secret strings of an object store's options and of the environment variables
    `env_names` (keys, tokens, connection strings and the keys inside them), longest first, to scrub."""
    found: list[str] = []

    def take(name: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for inner_name, inner in value.items():
                take(str(inner_name), inner)
        elif isinstance(value, str) and (_SECRET_OPTION.search(name) or _is_secret(name)):
            found.append(value)
            found.extend(_CONNECTION_SECRET.findall(value))

    for name, value in (options or {}).items():
        take(str(name), value)
    for name in env_names:
        take("secret", os.environ.get(name))
    pieces = {piece for piece in found if len(piece) >= 4}
    pieces |= {urllib.parse.quote(piece, safe="") for piece in pieces}
    return sorted(pieces, key=len, reverse=True)
