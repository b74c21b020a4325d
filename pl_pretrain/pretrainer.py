"""Pretrainer: collect parameter files into one folder, then load each into its object.

The seed's API (SpeechBrain's ``speechbrain.utils.parameter_transfer.Pretrainer``) is kept name for
name. What it adds: `collect_files(internal_ddp_handling=True)` runs the distributed protocol
(one fetch per job or per node, the same mapping on every rank, a failure raised on every rank);
`checksums` pin each file; `transfer_options` shape how a module's keys are loaded; and
`load_collected` returns a `TransferReport` per loadable.
"""

from __future__ import annotations

import datetime
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, cast

from pl_pretrain import distributed
from pl_pretrain._collection import Collection, Source, collect_arguments, collection_of, fetch_key, relay, show_source
from pl_pretrain._constants import DEFAULT_COLLECT_IN, PARAMFILE_EXT
from pl_pretrain._loading import (
    call_hook,
    check_shards_unchanged,
    forget_unreadable,
    found_in_collect_in,
    hooked_report,
    log_reports,
    verify_unchanged,
)
from pl_pretrain.conditions import condition_value
from pl_pretrain.errors import ConfigurationError, PretrainerError, TransferError
from pl_pretrain.fetching import (
    RECORD_DIR,
    FetchConfig,
    Fetched,
    FetchSource,
    LocalStrategy,
    as_fetch_source,
    check_file_name,
    parse_checksum,
)
from pl_pretrain.identity import FileIdentity, FolderProbe, all_match, check_pinned
from pl_pretrain.transfer import TransferOptions, TransferReport

__all__ = ["Pretrainer", "PARAMFILE_EXT", "shard_folder_name"]


def shard_folder_name(collected_name: str) -> str:
    """Returns the folder name, beside a collected index file, that holds its shards.

    ``encoder.ckpt`` -> ``encoder.shards``: the Pretrainer collects a sharded checkpoint's shards
    there, and passes that folder to the transfer (``shard_dir``).
    """
    return pathlib.Path(collected_name).stem + ".shards"


class Pretrainer:
    """Collects parameter files into one folder, then runs a load hook for each object.

    Args:
        collect_in: folder where each loadable's file is placed as ``<key>.ckpt`` (a link or a copy,
            by `LocalStrategy`). ``None`` places nothing: files are loaded from where they live
            (source folder, Hub cache, or ``$PL_PRETRAIN_CACHE`` for URLs).
        loadables: key -> object to load (a ``torch.nn.Module``, or anything with a hook).
        paths: key -> ``"<source>/<file>"``: a local path, a URL, a Hub ``org/repo/file`` or a
            `FetchSource`. Keys without a path take ``<default_source>/<key>.ckpt``.
        custom_hooks: key -> ``hook(obj, path)``, used before any default hook.
        conditions: key -> bool or zero-argument callable; a false condition skips fetch and load.
        checksums: key -> ``"sha256:<hex>"``, verified after every fetch and before every load.
        transfer_options: key -> `TransferOptions` (or a dict of its fields) for module transfers:
            key mapping, shape policy, strictness, safe loading.

    Example::

        pt = Pretrainer(collect_in="ckpts", loadables={"encoder": model.encoder},
                        paths={"encoder": "org/asr-model/encoder.ckpt"})
        pt.collect_files()
        pt.load_collected()
    """

    def __init__(
        self,
        collect_in: str | os.PathLike | None = DEFAULT_COLLECT_IN,
        loadables: Mapping[str, Any] | None = None,
        paths: Mapping[str, Source] | None = None,
        custom_hooks: Mapping[str, Callable[..., Any]] | None = None,
        conditions: Mapping[str, Any] | None = None,
        *,
        checksums: Mapping[str, str] | None = None,
        transfer_options: Mapping[str, TransferOptions | Mapping[str, Any]] | None = None,
    ) -> None:
        self.loadables: dict[str, Any] = {}
        self.paths: dict[str, Source] = {}
        self.custom_hooks: dict[str, Callable[..., Any]] = {}
        self.conditions: dict[str, Any] = {}
        self.checksums: dict[str, str] = {}
        self.transfer_options: dict[str, TransferOptions] = {}
        self.collect_in: pathlib.Path | None = None
        self.set_collect_in(collect_in)
        self.loadable_paths: dict[str, pathlib.Path] = {}
        self.collected: dict[str, Fetched] = {}
        self.reports: dict[str, TransferReport | None] = {}
        self._shard_pins: dict[str, dict[str, str]] = {}  # key -> shard name -> sha256, under a pinned index
        self._hooked: dict[str, TransferReport] = {}  # key -> a row for the table, for keys loaded by their own hook
        self._synchronised = False
        self._fetched_here = False  # this process ran the fetch (the fetching rank): it alone may remove files
        self._placed: dict[str, str] = {}  # key -> the collected file collect_files wrote into paths
        self._configured: dict[str, Source | None] = {}  # key -> the path it was collected from
        self._pins: dict[str, dict[str, FileIdentity]] = {}
        self._fetcher: int | None = None  # the rank that placed the collected files (None: unknown)
        self.add_loadables(loadables or {})
        self.add_paths(paths or {})
        self.add_custom_hooks(custom_hooks or {})
        self.add_conditions(conditions or {})
        self.add_checksums(checksums or {})
        self.add_transfer_options(transfer_options or {})

    # ----------------------------------------------------------------------------------------
    # Configuration (the seed's methods)
    # ----------------------------------------------------------------------------------------

    def set_collect_in(self, path: str | os.PathLike | None) -> None:
        """Changes the collection folder (``None``: load files from where they live)."""
        self.collect_in = None if path is None else pathlib.Path(path)

    def add_loadables(self, loadables: Mapping[str, Any]) -> None:
        """Adds or replaces loadables (key -> object)."""
        for key in loadables:
            _check_key(key)
        self.loadables.update(loadables)

    def add_paths(self, paths: Mapping[str, Source]) -> None:
        """Adds or replaces paths (key -> ``"<source>/<file>"``); they win over `default_source`."""
        self.paths.update(paths)

    def add_custom_hooks(self, custom_hooks: Mapping[str, Callable[..., Any]]) -> None:
        """Adds or replaces custom hooks (key -> ``hook(obj, path)``)."""
        for key, hook in custom_hooks.items():
            if not callable(hook):
                raise ConfigurationError(
                    f"custom_hooks['{key}'] is a {type(hook).__name__}, not a function.",
                    key=key,
                    hint="Pass a callable hook(obj, path).",
                )
        self.custom_hooks.update(custom_hooks)

    def add_conditions(self, conditions: Mapping[str, Any]) -> None:
        """Adds or replaces conditions (key -> bool or zero-argument callable)."""
        self.conditions.update(conditions)

    def add_checksums(self, checksums: Mapping[str, str]) -> None:
        """Adds or replaces pinned digests (key -> ``"sha256:<hex>"``)."""
        for key, checksum in checksums.items():
            parse_checksum(checksum, key=key)
        self.checksums.update(checksums)

    def add_transfer_options(self, options: Mapping[str, TransferOptions | Mapping[str, Any]]) -> None:
        """Adds or replaces transfer options (key -> `TransferOptions` or a dict of its fields)."""
        for key, value in options.items():
            self.transfer_options[key] = TransferOptions.coerce(value, key=key)

    @staticmethod
    def split_path(path: Source) -> tuple[Any, str]:
        """Returns (source, filename): ``"sb/asr/lm.ckpt"`` -> ``("sb/asr", "lm.ckpt")``.

        A bare name is a file in the current folder (``"lm.ckpt"`` -> ``("./", "lm.ckpt")``); a
        `FetchSource` keeps its kind: ``FetchSource(kind, "a/b/f")`` -> ``(FetchSource(kind, "a/b"), "f")``.
        """

        def split(text: str) -> tuple[str, str]:
            if "/" in text:
                source, filename = text.rsplit("/", maxsplit=1)
                return source, filename
            return "./", text

        pinned = as_fetch_source(path)
        if pinned is not None:
            fetch_from, inner = pinned
            source, filename = split(str(inner))
            return FetchSource(fetch_from, source), filename
        return split(os.fspath(cast("str | os.PathLike[str]", path)))

    def is_loadable(self, name: str) -> bool:
        """Returns True when `name` has no condition, or its condition (bool or callable) is true.

        A string condition (from a YAML or command-line config) counts by its meaning: ``"False"``,
        ``"0"``, ``"no"``, ``"off"`` and ``""`` are false, ``"True"``, ``"1"``, ``"yes"``, ``"on"`` true.

        Raises:
            ConfigurationError: the condition raised, or is a string of another meaning; names the key.
        """
        return name not in self.conditions or condition_value(name, self.conditions[name])

    # ----------------------------------------------------------------------------------------
    # Collecting
    # ----------------------------------------------------------------------------------------

    def collect_files(
        self,
        default_source: Source | None = None,
        internal_ddp_handling: bool | LocalStrategy = False,
        *speechbrain_fetch_config: FetchConfig,
        local_strategy: LocalStrategy | None = None,
        fetch_config: FetchConfig | None = None,
        collect_per_node: bool | str = "auto",
        timeout: datetime.timedelta | float | None = None,
    ) -> dict[str, pathlib.Path]:
        """Returns key -> local path of each loadable's file, fetching what is missing.

        Two positional forms are understood, told apart by the type of the second argument: the
        seed's ``collect_files(default_source, internal_ddp_handling)`` (a ``bool``), and
        SpeechBrain >= 1.1's ``collect_files(default_source, local_strategy, fetch_config)`` (a
        `LocalStrategy`). Anything else there is a `TypeError`; nothing is reinterpreted.
        Afterwards ``paths[key]`` is the collected file, as in SpeechBrain.

        Args:
            default_source: where keys without a path are looked for, as ``<default_source>/<key>.ckpt``.
            internal_ddp_handling: run the distributed protocol: only the fetching rank fetches,
                every rank gets the same mapping, and an error on the fetching rank is raised on
                every rank. Must be called by every rank together. Without a process group this
                simply fetches.
            local_strategy: how files are placed in `collect_in`, see `LocalStrategy`
                (``None``: ``SYMLINK``). SpeechBrain's `LocalStrategy` is accepted.
            fetch_config: see `FetchConfig` (``None``: the defaults). SpeechBrain's `FetchConfig`
                is accepted and converted by value.
            collect_per_node: ``"auto"``: global rank 0 fetches once for the job, and streams
                the files to the first rank of each node that does not see its collection folder
                (over the process group; see docs/distributed.md); ``True``: the first rank of each
                node fetches for its node; ``False``: rank 0 fetches, and a node that does not see
                its folder is an error. With ``collect_in=None`` there is no folder to stream into,
                and ``"auto"`` fetches once per node.
            timeout: how long ranks wait for the fetching rank (default 24 h; env
                ``PL_PRETRAIN_COLLECT_TIMEOUT`` in seconds).

        Raises:
            PretrainerError: a `FetchError` (a ``ValueError``) or `ConfigurationError` naming the
                key, the source and what to change; under the protocol, on every rank.
            ArgumentTypeError: (a ``TypeError``) a positional argument, `local_strategy` or
                `fetch_config` of another type.
        """
        ddp, strategy, config = collect_arguments(
            internal_ddp_handling, speechbrain_fetch_config, local_strategy, fetch_config
        )
        per_node = distributed.as_per_node(collect_per_node)

        self._fetched_here = False
        planned: list[dict[str, tuple[Source, str]]] = []

        def describe() -> dict[str, Any]:
            # Run by every rank before anything is fetched; compared between ranks (a rank whose
            # keys, conditions, sources, checksums or folder differ fails every rank).
            planned.append(self._plan(default_source))
            return self._description(planned[-1], per_node, config)

        def work() -> Collection:
            self._fetched_here = True  # only the ranks that fetch run the work
            plan = planned[-1] if planned else self._plan(default_source)
            files = {key: self._fetch_one(key, *where, strategy, config) for key, where in plan.items()}
            return collection_of(distributed.global_rank(), files)

        if ddp:
            collection = distributed.run_once(
                work,
                per_node=per_node,
                probe=FolderProbe(self.collect_in) if self.collect_in is not None else None,
                check=lambda c: all(all_match(p) for p in c.pins.values()),
                timeout=timeout,
                describe=describe,
                relay=relay(self.collect_in, lambda key: shard_folder_name(key + PARAMFILE_EXT)),
            )
            self._synchronised = distributed.is_distributed()
        else:
            collection = work()
        self.collected = collection.files
        self._pins, self._fetcher = collection.pins, collection.fetcher
        self.loadable_paths = {key: fetched.path for key, fetched in self.collected.items()}
        for key, path in self.loadable_paths.items():
            # SpeechBrain points paths[key] at the collected file; where it came from is kept for
            # source_of, so that a later collect_files still asks the original source.
            if self.paths.get(key) != self._placed.get(key):
                self._configured[key] = self.paths.get(key)
            self.paths[key] = self._placed[key] = str(path)
        return dict(self.loadable_paths)

    def path_of(self, key: str) -> Source | None:
        """Returns the path configured for `key` (None: it comes from the default source).

        ``paths[key]``, unless `collect_files` pointed it at the collected file: then the path it
        was collected from.
        """
        path = self.paths.get(key)
        if path is not None and key in self._placed and path == self._placed[key]:
            return self._configured.get(key)
        return path

    def _description(
        self, plan: Mapping[str, tuple[Source, str]], per_node: object, config: FetchConfig
    ) -> dict[str, Any]:
        """Returns what this rank means to collect, field by field, to compare with the other ranks'."""
        return {
            "loadables": sorted(self.loadables),
            "conditions": {key: key in plan for key in sorted(self.loadables)},
            "paths": {
                key: f"{show_source(source, config.shown_query)}/{name}" for key, (source, name) in sorted(plan.items())
            },
            "checksums": {key: parse_checksum(value, key=key) for key, value in sorted(self.checksums.items())},
            "collect_in": None if self.collect_in is None else os.path.abspath(self.collect_in),
            "collect_per_node": per_node,
        }

    def source_of(self, key: str, default_source: Source | None = None) -> tuple[Source, str] | None:
        """Returns (source, filename) that `key` is fetched from, or None when it has no path and no default.

        A path in `paths` wins; otherwise the key is ``<default_source>/<key>.ckpt``. This is the one
        place that decides it: the fetch, the callback's checkpoint state and the CLI all ask here.
        """
        path = self.path_of(key)
        if path is not None:
            return self.split_path(path)
        if default_source is not None:
            return default_source, key + PARAMFILE_EXT
        return None

    def _plan(self, default_source: Source | None) -> dict[str, tuple[Source, str]]:
        """Returns key -> (source, filename) of every loadable to collect (conditions evaluated once, here)."""
        self._check_keys()
        requests = {}
        for key in self.loadables:
            if not self.is_loadable(key):
                continue
            where = self.source_of(key, default_source)
            if where is None:
                raise ConfigurationError(
                    f"No path for '{key}' and no default_source.",
                    key=key,
                    hint=f"Add paths={{'{key}': '<source>/<file>'}}, or pass collect_files(default_source=...).",
                )
            requests[key] = where
        return requests

    def _fetch_one(
        self, key: str, source: Source, filename: str, strategy: LocalStrategy, config: FetchConfig
    ) -> list[Fetched]:
        """Returns the fetched file for `key`, followed by its shards when it is a sharded checkpoint's index."""
        shard_dir, checksum = self._shard_dir(key), self.checksums.get(key)
        files, shard_pins = fetch_key(key, source, filename, self.collect_in, shard_dir, strategy, config, checksum)
        if shard_pins is not None:
            self._shard_pins[key] = shard_pins
        return files

    def _shard_dir(self, key: str) -> pathlib.Path | None:
        """Returns the folder that a sharded checkpoint's shards for `key` are collected into (None: none)."""
        return None if self.collect_in is None else self.collect_in / shard_folder_name(key + PARAMFILE_EXT)

    def _check_keys(self) -> None:
        known = set(self.loadables)
        for name, mapping in (
            ("paths", self.paths),
            ("custom_hooks", self.custom_hooks),
            ("conditions", self.conditions),
            ("checksums", self.checksums),
            ("transfer_options", self.transfer_options),
        ):
            unknown = sorted(set(mapping) - known)
            if unknown:
                raise ConfigurationError(
                    f"{name} names {', '.join(repr(k) for k in unknown)}, which {'is' if len(unknown) == 1 else 'are'} "
                    f"not among the loadables ({', '.join(sorted(known)) or 'none'}).",
                    key=unknown[0],
                    hint="Check the spelling, or add the object to loadables.",
                )

    # ----------------------------------------------------------------------------------------
    # Loading
    # ----------------------------------------------------------------------------------------

    def load_collected(self, *, log_report: bool = True) -> dict[str, TransferReport | None]:
        """Returns key -> `TransferReport` (None for non-module hooks) after loading every collected file.

        After `collect_files(internal_ddp_handling=True)` a failure on any rank is raised on every rank.
        If this rank did not call `collect_files` (SpeechBrain's ``run_on_main(collect_files)``
        pattern), the files are taken from ``<collect_in>/<key>.ckpt``.

        Args:
            log_report: log the reports as one table, on rank 0 only: at INFO when everything
                loaded, as one WARNING naming the loadables that did not load completely.
        """
        if not self.collected:
            self.collected = found_in_collect_in(self.collect_in, (k for k in self.loadables if self.is_loadable(k)))
            self._pins, self._fetcher = {}, None

        def work() -> dict[str, TransferReport | None]:
            return {key: self._load_one(key, fetched) for key, fetched in self.collected.items()}

        reports = distributed.run_everywhere(work) if self._synchronised else work()
        self.reports = reports
        if log_report and distributed.global_rank() == 0:
            log_reports(self.shown_reports())
        return reports

    def _load_one(self, key: str, fetched: Fetched) -> TransferReport | None:
        obj, custom_hook = self.loadables[key], self.custom_hooks.get(key)
        try:
            if key in self.checksums:
                # Verified again before loading: the file may have changed since it was collected.
                expected = parse_checksum(self.checksums[key], key=key)
                verify_unchanged(fetched, expected, fetched_here=self._fetched_here, fetcher=self._fetcher)
                check_shards_unchanged(fetched.path, expected, self._shard_pins.get(key), self._shard_dir(key))
            pins = self._pins.get(key, {})
            check_pinned(pins, fetched, self._fetcher, distributed.global_rank())
            options = self.transfer_options.get(key)
            result = call_hook(key, obj, fetched.path, custom_hook, options, self._shard_dir(key))
            # Checked again after: the bytes just loaded were the pinned ones (a replacement renames
            # over the path, and a file that was open keeps its bytes).
            check_pinned(pins, fetched, self._fetcher, distributed.global_rank())
        except PretrainerError as error:
            error.with_context(key=key, source=fetched.location)
            forget_unreadable(error, fetched, fetched_here=self._fetched_here)
            raise
        except Exception as error:  # a user's hook failing still names the key and the file
            raise TransferError(
                f"Loading '{fetched.path}' into {type(obj).__name__} failed: {type(error).__name__}: {error}",
                key=key,
                source=fetched.location,
            ) from error
        if isinstance(result, TransferReport):
            return result
        self._hooked[key] = hooked_report(obj, custom_hook, fetched.path)
        return None

    def shown_reports(self) -> dict[str, TransferReport | None]:
        """Returns the last load's reports for the table: those of `load_collected`, with a row for each hook-loaded key.

        `load_collected` gives ``None`` for a loadable its own hook loaded (the hook reports nothing);
        here that key has a report naming the hook and the file, so the table shows every loadable.
        """
        return {key: self._hooked.get(key) if report is None else report for key, report in self.reports.items()}

    # ----------------------------------------------------------------------------------------
    # What was loaded, from where
    # ----------------------------------------------------------------------------------------

    def provenance(self) -> dict[str, dict[str, Any]]:
        """Returns key -> where its file came from (source, file, revision, commit, etag, sha256) and its report."""
        out = {}
        for key, fetched in self.collected.items():
            entry: dict[str, Any] = {
                "source": fetched.source,
                "filename": fetched.filename,
                "location": fetched.location,
                "fetch_from": fetched.fetch_from.name,
                "revision": fetched.revision,
                "commit": fetched.commit,
                "etag": fetched.etag,
                "sha256": fetched.sha256,
                "size": fetched.size,
            }
            report = self.reports.get(key)
            if report is not None:
                entry["report"] = report.to_dict()
            out[key] = entry
        return out


def _check_key(key: Any) -> None:
    # A key becomes the file name <key>.ckpt inside collect_in: it must be a plain, visible name.
    try:
        if not isinstance(key, str) or key.strip(".") == "":
            raise ConfigurationError("not a usable name")
        check_file_name(key + PARAMFILE_EXT)
    except ConfigurationError:
        raise ConfigurationError(
            f"Loadable key {key!r} is not a plain file name: keys are non-empty strings, not '.' or '..', "
            f"without '/' or '\\', not absolute, and not starting with {RECORD_DIR!r}.",
            key=key if isinstance(key, str) else None,
            hint="Use a name such as 'encoder'; it becomes the file 'encoder.ckpt' inside collect_in.",
        ) from None
