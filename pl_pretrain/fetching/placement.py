"""Putting a file in place whole: temporary file + rename, atomic links, and a lock per destination.

A file appears at its destination only whole: copies and downloads are written to a temporary
file beside it and renamed into place, links are replaced atomically. Each destination is guarded
by a cross-process file lock, so two processes collecting into one folder never tear each other's
files; whoever holds the lock also removes what killed writers left behind.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import pathlib
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator

import filelock

from pl_pretrain._constants import RECORD_DIR
from pl_pretrain.errors import FetchError
from pl_pretrain.fetching.sources import LocalStrategy

logger = logging.getLogger(__name__)

_CHUNK = 8 * 1024 * 1024
_LOCK_TIMEOUT_S = 6 * 3600.0
_LOCK_POLL_S = 5.0

_STALE_TMP = re.compile(r"[0-9a-f]{32}\.tmp")  # what follows ".<name>." in a name `_tmp_beside` made
_STALE_SCRATCH = re.compile(r"-[0-9a-f]{32}")  # what follows "hub-<name>" in a name `_scratch_dir` made

_symlink_fallback_warned = False
"""Set once the fallback from links to copies was reported: one warning per process, not per file."""


_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class ReadOnlyFolder(Exception):
    """The collection folder cannot be written (a read-only mount, no permission): nothing can be
    locked or placed there, only reused as its records vouch (see `fetch_file`)."""

    def __init__(self, folder: pathlib.Path, error: OSError) -> None:
        super().__init__(f"'{folder}' cannot be written: {error.strerror or error}")
        self.folder = folder
        self.reason = error.strerror or str(error)


@contextlib.contextmanager
def _locked(savedir: pathlib.Path, save_filename: str) -> Iterator[None]:
    """Holds the cross-process lock of one destination file, and cleans its stale temporary files."""
    lock_path = savedir / RECORD_DIR / f"{save_filename}.lock"
    lock = filelock.FileLock(str(lock_path), timeout=_LOCK_POLL_S)
    waited = 0.0
    while True:
        try:
            lock.acquire()
            break
        except OSError as error:
            if error.errno in _READ_ONLY:
                raise ReadOnlyFolder(savedir, error) from None
            raise
        except filelock.Timeout:
            waited += _LOCK_POLL_S
            if waited == _LOCK_POLL_S:
                logger.info("Waiting for another process that is collecting '%s' (lock %s).", save_filename, lock_path)
            if waited >= _LOCK_TIMEOUT_S:
                raise FetchError(
                    f"Gave up after {waited:.0f} s waiting for the lock {lock_path}, held by another process.",
                    hint="Check for a stuck job collecting into the same folder, or remove the lock file.",
                ) from None
    try:
        # Writers hold this lock, so any temporary file or scratch folder of this destination is
        # left over from a killed process: it is never trusted and can go.
        # Only this destination's own names: `.<name>.<32 hex>.tmp` and `hub-<name>-<32 hex>`, so
        # that key `a` never removes the in-flight files of key `a.ckpt.b`.
        name = glob.escape(save_filename)
        for stale in savedir.glob(f".{name}.*.tmp"):
            if _STALE_TMP.fullmatch(stale.name[len(save_filename) + 2 :]):
                stale.unlink(missing_ok=True)
        for stale in (savedir / RECORD_DIR).glob(f"{_SCRATCH_PREFIX}{name}-*"):
            if _STALE_SCRATCH.fullmatch(stale.name[len(_SCRATCH_PREFIX) + len(save_filename) :]):
                shutil.rmtree(stale, ignore_errors=True)
        # A partial download is kept for the next run only with the record of its validator: without
        # it nobody can ask the server whether the bytes still belong to the same file.
        partial, validator = _partial_paths(savedir, save_filename)
        if not validator.is_file():
            partial.unlink(missing_ok=True)
        elif not partial.is_file():
            validator.unlink(missing_ok=True)
        yield
    finally:
        lock.release()


# The prefix is "hub-" because the Hub was the first kind to need a scratch folder; folders left
# by earlier versions are cleaned by the same pattern.
_SCRATCH_PREFIX = "hub-"


def _scratch_dir(savedir: pathlib.Path, save_filename: str) -> pathlib.Path:
    """Returns a fresh folder name for one download into `savedir`; `_locked` removes it if its writer died."""
    return savedir / RECORD_DIR / f"{_SCRATCH_PREFIX}{save_filename}-{uuid.uuid4().hex}"


def _partial_paths(savedir: pathlib.Path, save_filename: str) -> tuple[pathlib.Path, pathlib.Path]:
    """Returns (the partial file of a resumable download into `savedir`, the record of its validator)."""
    folder = savedir / RECORD_DIR
    return folder / f"{save_filename}.partial", folder / f"{save_filename}.partial.json"


def _make_dirs(folder: pathlib.Path, source: str) -> None:
    """Creates the collection folder and its record folder."""
    try:
        (folder / RECORD_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if error.errno in _READ_ONLY and folder.is_dir():
            raise ReadOnlyFolder(folder, error) from None
        raise FetchError(f"Could not create the folder '{folder}': {error}", source=source) from error


def _tmp_beside(dst: pathlib.Path) -> pathlib.Path:
    """Returns a temporary name beside `dst` (same filesystem, so the rename is atomic)."""
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


def _move(src: pathlib.Path, dst: pathlib.Path, source: str) -> None:
    """Renames a file fetched beside (or inside) the collection folder into place."""
    try:
        os.replace(src, dst)
    except OSError as error:
        raise FetchError(f"Could not move the fetched file into place at '{dst}': {error}", source=source) from error
