"""Checksums: hashing files, parsing pinned digests, and removing a file that fails its check.

A bad file is removed from wherever pl_pretrain put it (the collection folder, the Hub cache), so
the next fetch gets it again instead of serving the same bad bytes; a user's own file is never removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import re
from typing import Any

from pl_pretrain.errors import ChecksumError, ConfigurationError
from pl_pretrain.fetching.records import _remove_record
from pl_pretrain.fetching.sources import Fetched, FetchFrom

__all__ = ["file_sha256", "parse_checksum", "verify_sha256", "discard_unreadable"]

# One small buffer, reused: sha256 runs no faster with bigger reads, and hashing a 10 GB file must not
# add more than this to the memory of a collection (the stream between nodes counts on it).
_HASH_CHUNK = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def file_sha256(path: str | os.PathLike) -> str:
    """Returns the hex sha256 of a file, read in chunks."""
    return _digest_of(path, hashlib.sha256())


def _digest_of(path: str | os.PathLike, digest: Any) -> str:
    """Returns the hex digest of `digest` after it has been fed the file's bytes, through one reused buffer."""
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return str(digest.hexdigest())


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
        fate = _discard(fetched, actual)
        # Name the file that was hashed (a stale copy in collect_in is not its source), and where it came from.
        came_from = "" if str(fetched.path) == fetched.location else f" (collected from '{fetched.location}')"
        what = (
            f"'{fetched.path}'{came_from} changed after it was collected: it"
            if rehash
            else f"'{fetched.path}'{came_from}"
        )
        raise ChecksumError(
            f"{what} has sha256 {actual}, but sha256 {expected} was expected; {fate}.",
            source=fetched.source,
            hint="The download is corrupt or the source changed: fetch again, or update the pinned checksum.",
        )
    return dataclasses.replace(fetched, sha256=actual)


def discard_unreadable(fetched: Fetched) -> str:
    """Removes a file just fetched whose bytes cannot be parsed (a body cut short, a login page, a
    compressed body) and its record, so the next fetch gets it again; returns what became of it.

    Only the process that fetched the file may call this (the others may still be reading it). A
    Hub blob whose bytes match its ETag, and a user's own file, stay: only the link or copy goes.
    """
    return _discard(fetched)


def _checked(fetched: Fetched, expected: str | None) -> Fetched:
    """Returns `fetched`, verified against `expected` when a digest is pinned."""
    return fetched if expected is None else verify_sha256(fetched, expected)


def _is_sha256(text: str) -> bool:
    return bool(_SHA256.match(text))


def _discard(fetched: Fetched, actual: str | None = None) -> str:
    """Removes a bad file from wherever pl_pretrain put it; returns what became of it, for the message.

    Never removed: a user's own file (the source itself), and a Hub blob whose sha256 is its ETag
    (its bytes are the Hub's: another job's link may lead to it, and the pin is what is wrong);
    only this job's link or copy and its record go. A Hub blob that does not match its ETag is
    removed under huggingface_hub's own lock.
    """
    path = fetched.path
    if fetched.fetch_from is FetchFrom.LOCAL and os.path.abspath(path) == os.path.abspath(fetched.location):
        return "the file was left in place (it is the source itself)"
    try:
        if fetched.fetch_from is FetchFrom.HUGGING_FACE:
            pointer = path
            if path.is_symlink():
                pointer = pathlib.Path(os.path.join(path.parent, os.readlink(path)))
            real = pathlib.Path(os.path.realpath(pointer))
            if real.parent.name == "blobs" and _matches_its_etag(real, actual):
                if "snapshots" in path.parts:  # no link or copy of ours: the file is the cache's own
                    return "the file was left in the Hugging Face cache: its bytes are those the Hub's ETag names"
            elif "snapshots" in pointer.parts or real.parent.name == "blobs":
                _remove_hub_entry(pointer)
        elif fetched.fetch_from is FetchFrom.URI and path.is_symlink():
            # A link into the object-store cache: its copy goes too, else the next run would link the
            # same bytes again (an object's ETag, unchanged, does not vouch for the bytes).
            cached = pathlib.Path(os.path.realpath(path))
            cached.unlink(missing_ok=True)
            _remove_record(cached.parent, cached.name)
        path.unlink(missing_ok=True)  # unlink never follows a link: a linked source file stays
        _remove_record(path.parent, path.name)
    except OSError as error:
        return f"the file could not be removed ({error})"
    return "the file was removed"


def _matches_its_etag(blob: pathlib.Path, sha256: str | None) -> bool:
    """True when a Hub blob's bytes are those its name (the ETag) names: a sha256 for LFS files, a
    git blob sha1 for the others."""
    if _is_sha256(blob.name):
        return (sha256 or file_sha256(blob)) == blob.name
    if re.fullmatch(r"[0-9a-f]{40}", blob.name):
        return _digest_of(blob, hashlib.sha1(f"blob {blob.stat().st_size}\0".encode())) == blob.name
    return False


def _remove_hub_entry(pointer: pathlib.Path) -> None:
    """Removes a file of the Hub cache: its blob and the ``snapshots/<commit>/`` entry that names it,
    under huggingface_hub's lock for that blob (the one its downloads take)."""
    real = pathlib.Path(os.path.realpath(pointer))
    with _hub_blob_lock(real):
        if real.parent.name == "blobs":
            real.unlink(missing_ok=True)
        if "snapshots" in pointer.parts:
            pointer.unlink(missing_ok=True)


def _hub_blob_lock(blob: pathlib.Path) -> contextlib.AbstractContextManager[object]:
    """Returns huggingface_hub's lock of `blob` (``<cache>/.locks/<repo folder>/<etag>.lock``), or no lock
    when `blob` is not laid out as its cache is."""
    if blob.parent.name != "blobs":
        return contextlib.nullcontext()
    from huggingface_hub.utils import WeakFileLock

    repo_folder = blob.parent.parent
    lock_path = repo_folder.parent / ".locks" / repo_folder.name / f"{blob.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    return WeakFileLock(lock_path)
