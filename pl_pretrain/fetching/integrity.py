"""Checksums: hashing files, parsing pinned digests, and removing a file that fails its check.

A bad file is removed from wherever pl_pretrain put it (the collection folder, the Hub cache), so
the next fetch gets it again instead of serving the same bad bytes; a user's own file is never removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re

from pl_pretrain.errors import ChecksumError, ConfigurationError
from pl_pretrain.fetching.records import _remove_record
from pl_pretrain.fetching.sources import Fetched, FetchFrom

__all__ = ["file_sha256", "parse_checksum", "verify_sha256"]

_CHUNK = 8 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def file_sha256(path: str | os.PathLike) -> str:
    """Returns the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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


def _checked(fetched: Fetched, expected: str | None) -> Fetched:
    """Returns `fetched`, verified against `expected` when a digest is pinned."""
    return fetched if expected is None else verify_sha256(fetched, expected)


def _is_sha256(text: str) -> bool:
    return bool(_SHA256.match(text))


def _discard(fetched: Fetched) -> bool:
    """Removes a bad file from wherever pl_pretrain put it; returns False when it is the user's own file."""
    path = fetched.path
    if fetched.fetch_from is FetchFrom.LOCAL and os.path.abspath(path) == os.path.abspath(fetched.location):
        return False  # NO_LINK, or the source folder is the collection folder: the user's file
    if fetched.fetch_from is FetchFrom.HUGGING_FACE:
        # Else the Hub cache would serve the same bad bytes again.
        pointer = pathlib.Path(os.path.join(path.parent, os.readlink(path))) if path.is_symlink() else path
        _remove_hub_entry(pointer)
    elif fetched.fetch_from is FetchFrom.URI and path.is_symlink():
        # A link into the object-store cache: else the cache would serve the same bad bytes again.
        cached = pathlib.Path(os.path.realpath(path))
        cached.unlink(missing_ok=True)
        _remove_record(cached.parent, cached.name)
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
