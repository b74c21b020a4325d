"""The orchestration: `fetch` and `fetch_file` check the arguments, pick the source kind and run it under the destination's lock."""

from __future__ import annotations

import logging
import os
import pathlib

from pl_pretrain.errors import ConfigurationError, FetchError
from pl_pretrain.fetching import http, hub, local, objectstore
from pl_pretrain.fetching.integrity import _checked
from pl_pretrain.fetching.kinds import Request, SourceKind
from pl_pretrain.fetching.network import ProgressGroup
from pl_pretrain.fetching.placement import ReadOnlyFolder, _locked, _make_dirs
from pl_pretrain.fetching.sources import (
    FetchConfig,
    Fetched,
    FetchFrom,
    FetchSource,
    LocalStrategy,
    as_fetch_config,
    as_local_strategy,
    check_file_name,
    guess_source,
)

__all__ = ["fetch", "fetch_file"]

logger = logging.getLogger(__name__)

# The first kind whose `fetch_from` matches and that handles the source reads it: a kind that takes
# only some URL schemes goes before `http`, which takes every `FetchFrom.URI` source.
_KINDS: tuple[SourceKind, ...] = (
    local.KIND,
    hub.KIND,
    objectstore.KIND,
    http.KIND,
)


def fetch(
    filename: str,
    source: str | os.PathLike | FetchSource,
    savedir: str | os.PathLike | None = None,
    save_filename: str | None = None,
    local_strategy: LocalStrategy = LocalStrategy.SYMLINK,
    fetch_config: FetchConfig | None = None,
) -> pathlib.Path:
    """Returns the local path of `filename` from `source`, fetching and placing it as needed.

    Args:
        filename: the file's name inside the source (may contain ``/`` for a subfolder).
        source: a local folder, an ``http(s)://`` address prefix, a Hub repo id, or a `FetchSource`.
        savedir: the folder to place the file in; ``None`` places nothing (strategy ``NO_LINK``;
            URLs then go to ``$PL_PRETRAIN_CACHE``, default ``~/.cache/pl_pretrain``).
        save_filename: the name inside `savedir` (default: the last part of `filename`).
        local_strategy: how the file is placed in `savedir`, see `LocalStrategy`.
        fetch_config: see `FetchConfig`; ``None`` means ``FetchConfig()``.

    Raises:
        FetchError: (a ``ValueError``) naming the source, the file and the cause.
    """
    return fetch_file(filename, source, savedir, save_filename, local_strategy, fetch_config).path


def fetch_file(
    filename: str,
    source: str | os.PathLike | FetchSource,
    savedir: str | os.PathLike | None = None,
    save_filename: str | None = None,
    local_strategy: LocalStrategy = LocalStrategy.SYMLINK,
    fetch_config: FetchConfig | None = None,
    *,
    sha256: str | None = None,
) -> Fetched:
    """Like `fetch`, but returns the whole `Fetched` record (path, commit, etag, sha256, size).

    When `sha256` (a hex digest) is given, the placed file is verified against it, whether it was
    just fetched or already there; a file that does not match is removed and `ChecksumError` raised.
    """
    return _fetch(filename, source, savedir, save_filename, local_strategy, fetch_config, sha256=sha256)


def _fetch(
    filename: str,
    source: str | os.PathLike | FetchSource,
    savedir: str | os.PathLike | None,
    save_filename: str | None,
    local_strategy: LocalStrategy,
    fetch_config: FetchConfig | None,
    *,
    sha256: str | None = None,
    progress: ProgressGroup | None = None,
) -> Fetched:
    """`fetch_file`, with a progress bar shared among files fetched at once (`progress`)."""
    config = as_fetch_config(fetch_config)
    strategy = as_local_strategy(local_strategy)
    fetch_from, source_text = guess_source(source)
    filename = str(filename)
    if not filename or filename.startswith("/") or ".." in filename.split("/"):
        raise ConfigurationError(
            f"File name {filename!r} must be a relative path inside the source, without '..'.",
            source=source_text,
        )
    kind = _kind_for(fetch_from, source_text)
    save_filename = check_file_name(save_filename if save_filename is not None else kind.default_name(filename))
    expected = sha256.lower() if sha256 is not None else None

    if savedir is None:
        savedir_path = kind.default_savedir(source_text, filename)
        # A kind with no place of its own (URLs) downloads into its default folder, keeping no other copy.
        strategy = LocalStrategy.NO_LINK if savedir_path is None else LocalStrategy.COPY_SKIP_CACHE
    else:
        savedir_path = pathlib.Path(savedir).expanduser().absolute()
    request = Request(source_text, filename, savedir_path, save_filename, strategy, config, progress)

    kind.check(request)
    if savedir_path is None or strategy is LocalStrategy.NO_LINK:
        where_it_lives = kind.unplaced(request)
        if where_it_lives is not None:
            return _checked(where_it_lives, expected)
    assert savedir_path is not None  # only kinds with a default folder have no place of their own
    try:
        _make_dirs(savedir_path, kind.shown(source_text))
        with _locked(savedir_path, save_filename):
            # Verified under the lock: a bad file is removed before another process can reuse it.
            return _checked(kind.placed(request), expected)
    except ReadOnlyFolder as error:
        read_only = error
    return _read_only(kind, request, expected, read_only)


def _read_only(kind: SourceKind, request: Request, expected: str | None, error: ReadOnlyFolder) -> Fetched:
    """A collection folder that cannot be written (the offline recipe: collected on a login node,
    mounted read-only on the compute nodes): its file is reused, without a lock, when its record
    vouches for it (source, revision, strategy, size, identity of the file); else one clear error."""
    shown = kind.shown(request.source)
    fetched = kind.reusable(request)
    if fetched is None:
        raise FetchError(
            f"The collection folder {error}, and '{request.save_filename}' in it is not a file collected from "
            f"'{shown}' that can be reused as is (it is missing, has no record, or its record names another "
            "source, revision, strategy or size).",
            source=shown,
            hint="Collect it where the folder is writable (for example `pl-pretrain fetch` on the login node), "
            "or give a writable collect_in.",
        )
    logger.info("'%s' is read-only; reusing '%s', which its record vouches for.", error.folder, fetched.path)
    return _checked(fetched, expected)


def _has_own_place(source: str | os.PathLike | FetchSource, filename: str) -> bool:
    """True when the kind of `source` keeps files where they live (a folder, the Hub cache); False for URLs."""
    fetch_from, source_text = guess_source(source)
    return _kind_for(fetch_from, source_text).default_savedir(source_text, filename) is None


def _kind_for(fetch_from: FetchFrom, source: str) -> SourceKind:
    for kind in _KINDS:
        if kind.fetch_from is fetch_from and kind.handles(source):
            return kind
    raise ConfigurationError(
        f"No source kind reads {fetch_from.name} source '{source}'.",
        hint="Use a local folder, an http(s):// address or a Hugging Face Hub repo id.",
    )
