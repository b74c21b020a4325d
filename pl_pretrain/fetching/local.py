"""Local-folder sources: a file linked or copied from a folder on this machine.

A collected copy or link is reused while the source file keeps the size and modification time
its record names, and a link still leads to it.
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
    _finish_placing,
    _identity,
    _read_record,
    _record_of,
    _same,
    _usable,
)
from pl_pretrain.fetching.sources import Fetched, FetchFrom, LocalStrategy


class LocalKind(SourceKind):
    """Existing folders."""

    fetch_from = FetchFrom.LOCAL

    def check(self, request: Request) -> None:
        src = _source_file(request)
        if not src.is_file():
            what = "is a folder, not a file" if src.is_dir() else "does not exist"
            raise FetchError(
                f"Local file '{src}' {what}.", source=request.source, hint="Check the file name and the folder."
            )

    def unplaced(self, request: Request) -> Fetched:
        src = _source_file(request)
        return Fetched(src, FetchFrom.LOCAL, request.source, request.filename, str(src), size=src.stat().st_size)

    def placed(self, request: Request) -> Fetched:
        source, filename, savedir, save_filename = (
            request.source,
            request.filename,
            request.savedir,
            request.save_filename,
        )
        strategy, config = request.strategy, request.config
        assert savedir is not None
        src = _source_file(request)
        dst = request.destination
        identity = _identity(FetchFrom.LOCAL, source, filename, None)
        stat = src.stat()
        record = _read_record(savedir, save_filename)
        if (
            not config.overwrite
            and _usable(dst)
            and record is not None
            and _same(record, identity, strategy)
            and record.get("size") == stat.st_size
            and record.get("mtime_ns") == stat.st_mtime_ns
            # a link must still lead to the source; a copy (SYMLINK fell back to COPY) is checked by size and time
            and (not dst.is_symlink() or os.path.realpath(dst) == os.path.realpath(src))
            and (strategy is not LocalStrategy.SYMLINK or dst.is_symlink() or record.get("linked") is False)
        ):
            return _fetched_from_record(record, dst, reused=True)
        _begin_placing(savedir, save_filename, source)
        path = _place(src, dst, strategy, source)
        placed = Fetched(path, FetchFrom.LOCAL, source, filename, str(src), size=stat.st_size)
        record = {**_record_of(placed, identity, strategy), "mtime_ns": stat.st_mtime_ns, "linked": path.is_symlink()}
        _finish_placing(savedir, save_filename, record, source)
        return placed


KIND = LocalKind()


def _source_file(request: Request) -> pathlib.Path:
    return (pathlib.Path(request.source).expanduser() / request.filename).absolute()
