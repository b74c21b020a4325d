"""File identity: how every rank checks that the file it loads is the one its fetcher placed, and whether ranks see one folder.

The fetching rank pins each file it placed by its size, inode, and modification and change times
(and its sha256 when that was computed). A file that another job replaced (two jobs collecting two
revisions into one folder), that someone rewrote in place (``cp -p`` keeps the mtime, not the
ctime), or a stale copy of the same size on a node that does not share the folder, differs in at
least one of them. Every rank compares before it loads and again after, so what it loaded is what
was pinned: placement only ever replaces a file by renaming over it, and an open file keeps its bytes.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import uuid
from dataclasses import dataclass

from pl_pretrain.errors import FetchError
from pl_pretrain.fetching import RECORD_DIR, Fetched, file_sha256

__all__ = ["FileIdentity", "FolderProbe", "all_match", "check_pinned", "seen_now"]


@dataclass(frozen=True)
class FileIdentity:
    """What the fetching rank saw of one placed file (links followed).

    Attributes:
        size: bytes.
        inode: the inode number (the same on every client of a shared filesystem).
        mtime_ns: last modification, in nanoseconds.
        ctime_ns: last change of the inode (a rename over the file, a rewrite with ``cp -p``).
        sha256: the hex digest, when the fetch computed it (downloads, pinned checksums).
    """

    size: int
    inode: int
    mtime_ns: int
    ctime_ns: int
    sha256: str | None = None

    @classmethod
    def of(cls, path: str | os.PathLike, sha256: str | None = None) -> FileIdentity:
        """Returns the identity of the file at `path` now (raises `OSError` when there is none)."""
        st = os.stat(path)
        return cls(st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, sha256)

    def matches(self, path: str | os.PathLike) -> bool:
        """Returns True when the file at `path` is still this one (same size, inode and times)."""
        try:
            now = FileIdentity.of(path)
        except OSError:
            return False
        return (now.size, now.inode, now.mtime_ns, now.ctime_ns) == (
            self.size,
            self.inode,
            self.mtime_ns,
            self.ctime_ns,
        )

    def describe(self) -> str:
        """Returns the identity in words: size, sha256 (when known), inode and modification time."""
        parts = [f"{self.size} bytes"]
        if self.sha256:
            parts.append(f"sha256 {self.sha256}")
        when = datetime.datetime.fromtimestamp(self.mtime_ns / 1e9, tz=datetime.timezone.utc)
        parts += [f"inode {self.inode}", f"modified {when:%Y-%m-%d %H:%M:%S.%f} UTC"]
        return ", ".join(parts)


def seen_now(path: str | os.PathLike, pinned: FileIdentity) -> str:
    """Returns what is at `path` now, in words (its sha256 too when `pinned` has one, to compare)."""
    try:
        now = FileIdentity.of(path)
        if pinned.sha256:
            now = FileIdentity.of(path, file_sha256(path))
    except OSError as error:
        return f"no readable file ({error.strerror or error})"
    return now.describe()


def all_match(pins: dict[str, FileIdentity]) -> bool:
    """Returns True when every pinned path still holds its pinned file here."""
    return all(identity.matches(path) for path, identity in pins.items())


class FolderProbe:
    """Marks a collection folder so that other nodes can tell whether they see the same one."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder / RECORD_DIR

    def mark(self) -> str | None:
        token = uuid.uuid4().hex
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"shared-{token}").write_text(token)
        return token

    def sees(self, token: str) -> bool:
        try:
            return (self.folder / f"shared-{token}").read_text() == token
        except OSError:
            return False

    def clear(self, token: str) -> None:
        (self.folder / f"shared-{token}").unlink(missing_ok=True)


def check_pinned(pins: dict[str, FileIdentity], fetched: Fetched, fetcher: int | None, rank: int) -> None:
    """Raises `FetchError` when a pinned file, seen from `rank`, is no longer the one rank `fetcher` placed (naming both)."""
    for path, pinned in pins.items():
        if not pinned.matches(path):
            revision = f" (revision {fetched.revision})" if fetched.revision else ""
            raise FetchError(
                f"'{path}' is not the file that rank {fetcher} collected for this job: rank {fetcher} placed "
                f"{pinned.describe()}{revision}; rank {rank} finds {seen_now(path, pinned)}. Another job (or a "
                "person) replaced it meanwhile, or this node sees another folder at the same path.",
                source=fetched.source,
                hint="Give each job (each revision) its own collect_in, and run the job again.",
            )
