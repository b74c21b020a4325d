"""Collecting: one key's fetch (its file, its shards), the pinned collection every rank receives, the argument forms.

The machinery under `Pretrainer.collect_files`. The Pretrainer decides what each key is
(``<key>.ckpt``, ``<key>.shards/``, where it comes from) and runs the distributed protocol;
here is what the fetching rank does for one key, and the `Collection` it sends every rank: the
files, each pinned by its identity, and who placed them (`pl_pretrain.identity`).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

from pl_pretrain._constants import PARAMFILE_EXT
from pl_pretrain._shards import pin_shards
from pl_pretrain.errors import ArgumentTypeError, ChecksumError, FetchError, OfflineError, PretrainerError
from pl_pretrain.fetching import (
    FetchConfig,
    Fetched,
    FetchFrom,
    FetchSource,
    LocalStrategy,
    as_fetch_config,
    as_fetch_source,
    as_local_strategy,
    fetch_file,
    fetch_shards,
    guess_source,
    parse_checksum,
    redact_url,
)
from pl_pretrain.identity import FileIdentity
from pl_pretrain.replication import CollectedFiles
from pl_pretrain.transfer import shard_names

__all__ = ["Collection", "Source", "collect_arguments", "collection_of", "fetch_key", "relay", "show_source"]

Source = str | os.PathLike | FetchSource


class Collection(NamedTuple):
    """What the fetching rank sends every rank it fetched for: the files, pinned, and who placed them."""

    fetcher: int
    files: dict[str, Fetched]
    pins: dict[str, dict[str, FileIdentity]]  # key -> {path: identity} (the file and its shards)


def collect_arguments(
    second: Any, rest: tuple[Any, ...], local_strategy: Any, fetch_config: Any
) -> tuple[bool, LocalStrategy, FetchConfig]:
    """Returns (internal_ddp_handling, strategy, config) from either positional form of `collect_files`."""
    if isinstance(second, bool):
        if rest:
            raise ArgumentTypeError(
                f"collect_files() got a third positional argument ({_type_name(rest[0])}) after "
                "internal_ddp_handling; fetch_config is keyword-only in this form.",
                hint="Pass fetch_config=FetchConfig(...) by keyword.",
            )
        ddp = second
    elif _is_strategy(second):
        if local_strategy is not None:
            raise ArgumentTypeError(
                "collect_files() got local_strategy both as its second positional argument and by keyword.",
                hint="Pass it once.",
            )
        if len(rest) > 1:
            raise ArgumentTypeError(
                f"collect_files() takes at most 3 positional arguments (default_source, local_strategy, "
                f"fetch_config); got {len(rest) + 2}."
            )
        if rest and fetch_config is not None:
            raise ArgumentTypeError(
                "collect_files() got fetch_config both as its third positional argument and by keyword.",
                hint="Pass it once.",
            )
        ddp, local_strategy = False, second
        if rest:
            fetch_config = as_fetch_config(rest[0], where="fetch_config (the third positional argument)")
    else:
        raise ArgumentTypeError(
            f"collect_files()'s second positional argument is a {_type_name(second)}: it must be "
            "internal_ddp_handling (a bool) or, in SpeechBrain's form, local_strategy (a LocalStrategy).",
            hint="Pass local_strategy=LocalStrategy.COPY (or internal_ddp_handling=True) by keyword.",
        )
    strategy = LocalStrategy.SYMLINK if local_strategy is None else as_local_strategy(local_strategy)
    return ddp, strategy, as_fetch_config(fetch_config)


def _is_strategy(value: Any) -> bool:
    try:
        as_local_strategy(value)
    except TypeError:
        return False
    return True


def _type_name(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def show_source(source: Source, shown_query: tuple[str, ...] = ()) -> str:
    """Returns `source` as errors and the ranks' comparison show it: a URL without its secrets."""
    try:
        fetch_from, text = guess_source(source)
    except PretrainerError:
        pinned = as_fetch_source(source)
        return os.fspath(cast("str | os.PathLike[str]", source)) if pinned is None else str(pinned.path)
    if fetch_from is FetchFrom.URI:
        return redact_url(text, shown_query)
    return text


def fetch_key(
    key: str,
    source: Source,
    filename: str,
    collect_in: pathlib.Path | None,
    shard_dir: pathlib.Path | None,
    strategy: LocalStrategy,
    config: FetchConfig,
    checksum: str | None,
) -> tuple[list[Fetched], dict[str, str] | None]:
    """Returns ([the fetched file for `key`, its shards when it is a sharded checkpoint's index], the shards' pins).

    The file is placed in `collect_in` as ``<key>.ckpt``, the shards in `shard_dir`. The pins
    (shard name -> sha256) are None unless `checksum` (``"sha256:<hex>"``) pins the index.

    Raises:
        PretrainerError: naming the key and the source (anything unforeseen as a `FetchError`).
    """
    shown = show_source(source, config.shown_query)
    expected = parse_checksum(checksum, key=key) if checksum is not None else None
    try:
        fetched = fetch_file(filename, source, collect_in, key + PARAMFILE_EXT, strategy, config, sha256=expected)
        shards = shard_names(fetched.path)
        if not shards:
            return [fetched], None
        # A sharded checkpoint's index: its shards live beside it in the source, and are collected,
        # several at a time, into `shard_dir` (<collect_in>/<key>.shards/); with no collect_in they
        # stay where they live, URL shards beside their index.
        parts = fetch_shards(
            shards,
            source,
            filename.rpartition("/")[0],
            shard_dir,
            fetched.path,
            strategy,
            config,
            desc=key,
            on_failure=lambda error, name: _named_by_the_index(error, name, filename),
        )
        pins = None
        if expected is not None:  # the pin covers the shards too (see pl_pretrain._shards)
            pins = pin_shards(expected, dict(zip(shards, parts, strict=True)), shard_dir)
        return [fetched, *parts], pins
    except PretrainerError as error:
        error.with_context(key=key, source=shown)
        raise
    except Exception as error:  # anything unforeseen still names the key and the source
        raise FetchError(f"{type(error).__name__}: {error}", key=key, source=shown) from error


def _named_by_the_index(error: PretrainerError, shard: str, index: str) -> None:
    """A shard's name comes from its index, not from `paths`: the error says so, and what to check."""
    error.message = f"Shard '{shard}', which the sharded checkpoint's index '{index}' lists: {error.message}"
    if isinstance(error, FetchError) and not isinstance(error, (OfflineError, ChecksumError)):
        error.hint = (
            "The index names a shard its source does not hold: check that every shard listed in the index's "
            "weight_map was uploaded beside it (and the revision)."
        )


def collection_of(fetcher: int, files: Mapping[str, list[Fetched]]) -> Collection:
    """Returns the collection of key -> [file, shards...] placed by rank `fetcher`, each file pinned as it is now."""
    pins = {key: {str(f.path): FileIdentity.of(f.path, f.sha256) for f in placed} for key, placed in files.items()}
    return Collection(fetcher, {key: placed[0] for key, placed in files.items()}, pins)


def relay(collect_in: pathlib.Path | None, shard_folder: Callable[[str], str]) -> CollectedFiles | None:
    """Returns how a collection travels to nodes that do not see `collect_in` (None: no folder to stream into)."""
    if collect_in is None:
        return None
    return CollectedFiles(collect_in, shard_folder, lambda c: c.files, _received)


def _received(collection: Collection, files: dict[str, Fetched]) -> Collection:
    # This node's copies are pinned by what this node sees of them (its own inodes and times).
    pins: dict[str, dict[str, FileIdentity]] = {}
    for key, fetched in files.items():
        paths = [str(fetched.path)] + [p for p in collection.pins.get(key, {}) if p != str(collection.files[key].path)]
        pins[key] = {}
        for path in paths:
            with contextlib.suppress(OSError):  # not on this node: the check of the collected files fails for it
                pins[key][path] = FileIdentity.of(path, fetched.sha256 if path == str(fetched.path) else None)
    return Collection(collection.fetcher, files, pins)
