"""A file whose bytes arrive from elsewhere in pieces: written beside its destination, checked, fsynced, renamed and recorded.

`Arrival` is what a node that shares no disk with the fetcher writes the fetcher's file into: the
bytes go to a temporary file under the destination's lock, and only when their size and sha256
are the ones the fetcher announced is the file fsynced, renamed into place and given a record, like
any fetched file. Until then nothing is at the destination (a file being replaced loses its record
first), and a writer that dies leaves only a temporary file that the next holder of the lock removes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib

from pl_pretrain.errors import ChecksumError, FetchError
from pl_pretrain.fetching.placement import _locked, _make_dirs, _tmp_beside
from pl_pretrain.fetching.records import (
    _begin_placing,
    _fetched_from_record,
    _finish_placing,
    _fsync_dir,
    _identity,
    _read_record,
    _record_of,
    _unchanged,
)
from pl_pretrain.fetching.sources import Fetched, LocalStrategy

__all__ = ["Arrival", "holds", "recorded"]

# The receiving node holds a copy of the fetcher's file, whatever the fetcher's strategy was.
_STRATEGY = LocalStrategy.COPY


def holds(savedir: pathlib.Path, save_filename: str, like: Fetched) -> bool:
    """Returns True when `savedir` already holds `save_filename` as a copy of the file `like` describes.

    Only a record that vouches for the same identity, size and sha256 counts: without a sha256
    from the sender there is nothing to compare, and the file is received again.
    """
    record = _read_record(savedir, save_filename)
    if record is None or like.sha256 is None:
        return False
    identity = _identity(like.fetch_from, like.source, like.filename, like.revision)
    return (
        all(record.get(k) == v for k, v in identity.items())
        and record.get("sha256") == like.sha256
        and record.get("size") == like.size
        and _unchanged(record, savedir / save_filename)
    )


class Arrival:
    """The destination of one file that arrives in pieces (see the module docstring).

    Args:
        savedir: the folder to place the file in.
        save_filename: its name there.
        like: the fetcher's record of the file (its identity, and its size); the placed file gets
            the same identity, with this node's path.
        size: the number of bytes that will arrive.
    """

    def __init__(self, savedir: pathlib.Path, save_filename: str, like: Fetched, size: int) -> None:
        self.savedir = savedir
        self.save_filename = save_filename
        self.like = like
        self.size = size
        self.received = 0
        self._digest = hashlib.sha256()
        self._stack = contextlib.ExitStack()
        try:
            _make_dirs(savedir, like.source)
            self._stack.enter_context(_locked(savedir, save_filename))
            self.tmp = _tmp_beside(savedir / save_filename)
            self._file = self._stack.enter_context(open(self.tmp, "wb"))  # noqa: SIM115 (held until commit or discard)
        except BaseException:
            self._stack.close()
            raise

    def write(self, data: memoryview) -> None:
        """Appends `data` to the temporary file."""
        self.received += len(data)
        if self.received > self.size:
            raise FetchError(f"More than the announced {self.size} bytes arrived for '{self.destination}'.")
        self._digest.update(data)
        try:
            self._file.write(data)
        except OSError as error:
            raise FetchError(
                f"Could not write '{self.tmp}': {error}", source=self.like.source, hint="Check free space on this node."
            ) from error

    @property
    def destination(self) -> pathlib.Path:
        return self.savedir / self.save_filename

    def commit(self, sha256: str) -> Fetched:
        """Returns the placed file's record once its bytes match `sha256`; else removes them and raises.

        Raises:
            ChecksumError: the bytes that arrived are not the sender's (size or sha256).
        """
        try:
            actual = self._digest.hexdigest()
            if self.received != self.size or actual != sha256:
                raise ChecksumError(
                    f"The copy of '{self.like.location}' that arrived for '{self.destination}' has "
                    f"{self.received} bytes and sha256 {actual}, but the sender sent {self.size} bytes with sha256 "
                    f"{sha256}: it was corrupted on the way; nothing was placed.",
                    source=self.like.source,
                    hint="Check the network between the nodes, then run again.",
                )
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            placed = dataclasses.replace(self.like, path=self.destination, sha256=actual, size=self.size, reused=False)
            identity = _identity(self.like.fetch_from, self.like.source, self.like.filename, self.like.revision)
            _begin_placing(self.savedir, self.save_filename, self.like.source)
            try:
                os.replace(self.tmp, self.destination)
            except OSError as error:
                raise FetchError(
                    f"Could not move the received file into place at '{self.destination}': {error}",
                    source=self.like.source,
                ) from error
            _fsync_dir(self.savedir)
            _finish_placing(self.savedir, self.save_filename, _record_of(placed, identity, _STRATEGY), self.like.source)
            return placed
        finally:
            self.discard()

    def discard(self) -> None:
        """Removes the temporary file (if still there) and releases the lock; safe to call twice."""
        with contextlib.suppress(OSError):
            self._file.close()
        self.tmp.unlink(missing_ok=True)
        self._stack.close()


def recorded(savedir: pathlib.Path, save_filename: str) -> Fetched | None:
    """Returns what the record of `save_filename` in `savedir` says about it (None: no record, or one being replaced)."""
    record = _read_record(savedir, save_filename)
    if record is None or "fetch_from" not in record:
        return None
    return _fetched_from_record(record, savedir / save_filename, reused=True)
