"""Local-folder sources: a file linked or copied from a folder on this machine.

A collected copy or link is reused while the source file keeps the size, modification time,
change time and inode its record names (a same-size rewrite with ``cp -p`` or ``rsync -t`` keeps
only the first two), the collected copy is unchanged, and a link still leads to it.
"""

from __future__ import annotations

import os
import pathlib

from pl_pretrain.errors import FetchError
from pl_pretrain.fetching.kinds import Request, SourceKind
from pl_pretrain.fetching.placement import _place
from pl_pretrain.fetching.records import (
    _begin_placing,
    _fetched_from_record,
    _file_stat,
    _finish_placing,
    _identity,
    _read_record,
    _record_of,
    _same,
    _unchanged,
    _usable,
)
from pl_pretrain.fetching.sources import Fetched, FetchFrom, LocalStrategy, not_a_hub_id


class LocalKind(SourceKind):
    """Existing folders."""

    fetch_from = FetchFrom.LOCAL

    def check(self, request: Request) -> None:
        folder = pathlib.Path(request.source).expanduser()
        if not folder.is_dir():
            why = not_a_hub_id(request.source)
            raise FetchError(
                f"No such local folder '{request.source}' (looked for '{request.filename}' in "
                f"'{folder.absolute()}'); nothing was asked of the network"
                + (f": it is not a Hugging Face Hub repo id, since {why}." if why else "."),
                source=request.source,
                hint="Check the path (a relative path starts in the current folder). For the Hub, name the repo "
                "as FetchSource(FetchFrom.HUGGING_FACE, 'org/repo') or, for a file in a subfolder of the repo, "
                "FetchSource(FetchFrom.HUGGING_FACE, 'org/repo/subfolder').",
            )
        src = _source_file(request)
        if not src.is_file():
            what = "is a folder, not a file" if src.is_dir() else "does not exist"
            raise FetchError(
                f"Local file '{src}' {what}.", source=request.source, hint="Check the file name and the folder."
            )

    def unplaced(self, request: Request) -> Fetched:
        src = _source_file(request)
        return Fetched(src, FetchFrom.LOCAL, request.source, request.filename, str(src), size=src.stat().st_size)

    def reusable(self, request: Request) -> Fetched | None:
        assert request.savedir is not None
        src = _source_file(request)
        dst = request.destination
        identity = _identity(FetchFrom.LOCAL, request.source, request.filename, None)
        record = _read_record(request.savedir, request.save_filename)
        stat = src.stat()
        if (
            not request.config.overwrite
            and _usable(dst)
            and record is not None
            and _same(record, identity, request.strategy)
            and record.get("size") == stat.st_size
            and record.get("mtime_ns") == stat.st_mtime_ns
            # a same-size rewrite keeping the mtime (cp -p, rsync -t) changes the change time, and rsync the inode
            and record.get("source_file") == _file_stat(src)
            and _unchanged(record, dst)
            # a link must still lead to the source; a copy (SYMLINK fell back to COPY) is checked by size and time
            and (not dst.is_symlink() or os.path.realpath(dst) == os.path.realpath(src))
            and (request.strategy is not LocalStrategy.SYMLINK or dst.is_symlink() or record.get("linked") is False)
        ):
            return _fetched_from_record(record, dst, reused=True)
        return None

    def placed(self, request: Request) -> Fetched:
        source, filename, savedir, save_filename = (
            request.source,
            request.filename,
            request.savedir,
            request.save_filename,
        )
        strategy = request.strategy
        assert savedir is not None
        src = _source_file(request)
        dst = request.destination
        identity = _identity(FetchFrom.LOCAL, source, filename, None)
        stat = src.stat()
        reused = self.reusable(request)
        if reused is not None:
            return reused
        _begin_placing(savedir, save_filename, source, source_file=src)
        path = _place(src, dst, strategy, source)
        placed = Fetched(path, FetchFrom.LOCAL, source, filename, str(src), size=stat.st_size)
        record = {
            **_record_of(placed, identity, strategy),
            "mtime_ns": stat.st_mtime_ns,
            "source_file": _file_stat(src),
            "linked": path.is_symlink(),
        }
        _finish_placing(savedir, save_filename, record, source)
        return placed


KIND = LocalKind()


def _source_file(request: Request) -> pathlib.Path:
    return (pathlib.Path(request.source).expanduser() / request.filename).absolute()
