"""What a collection folder holds and why it is trusted: one record per placed file, in ``<savedir>/.pl_pretrain/``.

A record names the file's source, file name, revision and strategy (its identity), and its size:
a file is reused only while its record vouches for it, so a changed source or revision is fetched
again instead of silently reusing the old file. A destination being replaced is marked first, so
a process killed half-way leaves a file that nothing vouches for.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
import uuid
from typing import Any

from pl_pretrain._constants import RECORD_DIR
from pl_pretrain.errors import FetchError
from pl_pretrain.fetching.sources import FetchConfig, Fetched, FetchFrom, LocalStrategy

logger = logging.getLogger(__name__)


def _record_path(savedir: pathlib.Path, save_filename: str) -> pathlib.Path:
    return savedir / RECORD_DIR / f"{save_filename}.json"


def _read_record(savedir: pathlib.Path, save_filename: str) -> dict[str, Any] | None:
    try:
        return json.loads(_record_path(savedir, save_filename).read_text())
    except (OSError, ValueError):
        return None


def _write_record(savedir: pathlib.Path, save_filename: str, record: dict[str, Any]) -> None:
    """Writes a record whole: fsynced before its rename, and the rename fsynced, so that after a
    power cut the record is either the old one or the new one, never empty or torn."""
    path = _record_path(savedir, save_filename)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w") as out:
            out.write(json.dumps(record, indent=1, sort_keys=True))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder: pathlib.Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems (and Windows) cannot open a folder; the rename still happened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_record(savedir: pathlib.Path, save_filename: str) -> None:
    _record_path(savedir, save_filename).unlink(missing_ok=True)


def _begin_placing(
    savedir: pathlib.Path, save_filename: str, source: str, *, source_file: pathlib.Path | None = None
) -> None:
    """Marks the destination as being replaced: a process killed before `_finish_placing` leaves a
    file that no record vouches for, so the next run places it again instead of trusting it.

    A file already there with no record at all was put there by the user (or an older tool): it is
    replaced, as SpeechBrain would, but not silently.
    """
    dst = savedir / save_filename
    if (
        (dst.exists() or dst.is_symlink())
        and not _record_path(savedir, save_filename).exists()
        and not (source_file is not None and _same_file(dst, source_file))  # the source is the destination
    ):
        logger.warning(
            "Replacing '%s', which pl_pretrain did not place (it has no record in '%s'), with the file from '%s'.",
            dst,
            savedir / RECORD_DIR,
            source,
        )
    try:
        _write_record(savedir, save_filename, {"placing": True})
    except OSError as error:
        raise FetchError(f"Could not write in '{savedir / RECORD_DIR}': {error}", source=source) from error


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _finish_placing(savedir: pathlib.Path, save_filename: str, record: dict[str, Any], source: str) -> None:
    """Writes the record of a file just placed; if that fails, the file goes too (nothing vouches for it)."""
    try:
        _write_record(savedir, save_filename, record)
    except OSError as error:
        (savedir / save_filename).unlink(missing_ok=True)
        raise FetchError(
            f"Could not record '{savedir / save_filename}' in '{savedir / RECORD_DIR}': {error}; the file was removed.",
            source=source,
        ) from error


def _identity(fetch_from: FetchFrom, source: str, filename: str, revision: str | None) -> dict[str, Any]:
    """Returns what makes two fetches the same file; `source` and `filename` carry no credentials."""
    return {
        "fetch_from": fetch_from.name,
        "source": source,
        "filename": filename,
        "revision": revision if fetch_from is FetchFrom.HUGGING_FACE else None,
    }


def _same(record: dict[str, Any], identity: dict[str, Any], strategy: LocalStrategy) -> bool:
    return all(record.get(k) == v for k, v in identity.items()) and record.get("strategy") == strategy.name


def _file_stat(path: pathlib.Path) -> dict[str, int] | None:
    """Returns what tells a file from a same-size rewrite that kept its mtime (``cp -p``, ``rsync -t``):
    its inode and change time beside size and mtime (of the file a link leads to)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def _record_of(fetched: Fetched, identity: dict[str, Any], strategy: LocalStrategy) -> dict[str, Any]:
    return {
        "file": _file_stat(fetched.path),
        **identity,
        "strategy": strategy.name,
        "location": fetched.location,
        "commit": fetched.commit,
        "etag": fetched.etag,
        "sha256": fetched.sha256,
        "size": fetched.size,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _fetched_from_record(record: dict[str, Any], path: pathlib.Path, reused: bool) -> Fetched:
    return Fetched(
        path=path,
        fetch_from=FetchFrom[record["fetch_from"]],
        source=record["source"],
        filename=record["filename"],
        location=record.get("location", ""),
        revision=record.get("revision"),
        commit=record.get("commit"),
        etag=record.get("etag"),
        sha256=record.get("sha256"),
        size=record.get("size", 0),
        reused=reused,
    )


def _reusable(
    savedir: pathlib.Path,
    save_filename: str,
    identity: dict[str, Any],
    strategy: LocalStrategy,
    config: FetchConfig,
    *,
    ask_again: bool = False,
) -> Fetched | None:
    """Returns the downloaded file already at the destination when it may be used as is, else None.

    `ask_again` (the Hub's ``allow_updates``) refuses even a file its record vouches for, so the
    source is asked whether it moved.
    """
    dst = savedir / save_filename
    if config.overwrite or not _usable(dst):
        return None
    record = _read_record(savedir, save_filename)
    if record is None:
        # A file put there by hand or by an older tool: SpeechBrain reuses it, and so do we.
        logger.info("Using '%s', which was already there (no record of its source).", dst)
        return Fetched(
            dst,
            FetchFrom[identity["fetch_from"]],
            identity["source"],
            identity["filename"],
            str(dst),
            revision=config.revision,
            size=dst.stat().st_size,
            reused=True,
        )
    # A file whose size no longer matches its record was cut short or rewritten by something else;
    # one rewritten at the same size keeps neither its inode nor its change time.
    if not ask_again and _same(record, identity, strategy) and _unchanged(record, dst):
        return _fetched_from_record(record, dst, reused=True)
    return None


def _unchanged(record: dict[str, Any], dst: pathlib.Path) -> bool:
    """True when `dst` is still the file its record describes (records of older versions: by size)."""
    stat = _file_stat(dst)
    if stat is None or stat["size"] != record.get("size"):
        return False
    recorded = record.get("file")
    return recorded is None or recorded == stat


def _size_of(path: pathlib.Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _usable(dst: pathlib.Path) -> bool:
    """True when `dst` is a file, or a link that leads to one."""
    return dst.is_file()
