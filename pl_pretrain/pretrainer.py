"""Pretrainer: collect parameter files into one folder, then load each into its object.

The seed's API (SpeechBrain's ``speechbrain.utils.parameter_transfer.Pretrainer``) is kept name for
name. What it adds: `collect_files(internal_ddp_handling=True)` runs the distributed protocol
(one fetch per job or per node, the same mapping on every rank, a failure raised on every rank);
`checksums` pin each file; `transfer_options` shape how a module's keys are loaded; and
`load_collected` returns a `TransferReport` per loadable.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

from pl_pretrain import distributed
from pl_pretrain._constants import DEFAULT_COLLECT_IN, PARAMFILE_EXT
from pl_pretrain._shards import check_pinned_shards, pin_shards, recorded_shards
from pl_pretrain.conditions import condition_value
from pl_pretrain.errors import (
    ArgumentTypeError,
    ChecksumError,
    ConfigurationError,
    FetchError,
    OfflineError,
    PretrainerError,
    TransferError,
)
from pl_pretrain.fetching import (
    RECORD_DIR,
    FetchConfig,
    Fetched,
    FetchFrom,
    FetchSource,
    LocalStrategy,
    as_fetch_config,
    as_fetch_source,
    as_local_strategy,
    check_file_name,
    discard_unreadable,
    fetch_file,
    fetch_shards,
    file_sha256,
    guess_source,
    parse_checksum,
    redact_url,
    verify_sha256,
)
from pl_pretrain.identity import FileIdentity, FolderProbe, all_match, check_pinned
from pl_pretrain.replication import CollectedFiles
from pl_pretrain.transfer import (
    DEFAULT_LOAD_HOOKS,
    DEFAULT_TRANSFER_HOOKS,
    TransferOptions,
    TransferReport,
    format_reports,
    get_default_hook,
    incomplete_keys,
    shard_names,
    shard_path,
    torch_parameter_transfer,
)
from pl_pretrain.transfer.speechbrain import speechbrain_hook

__all__ = ["Pretrainer", "PARAMFILE_EXT", "shard_folder_name"]

logger = logging.getLogger(__name__)


Source = str | os.PathLike | FetchSource


class _Collection(NamedTuple):
    """What the fetching rank sends every rank it fetched for: the files, pinned, and who placed them."""

    fetcher: int
    files: dict[str, Fetched]
    pins: dict[str, dict[str, FileIdentity]]  # key -> {path: identity} (the file and its shards)


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
        ddp, strategy, config = _collect_arguments(
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

        def work() -> _Collection:
            self._fetched_here = True  # only the ranks that fetch run the work
            plan = planned[-1] if planned else self._plan(default_source)
            files = {key: self._fetch_one(key, *where, strategy, config) for key, where in plan.items()}
            pins = {
                key: {str(f.path): FileIdentity.of(f.path, f.sha256) for f in placed} for key, placed in files.items()
            }
            return _Collection(distributed.global_rank(), {key: placed[0] for key, placed in files.items()}, pins)

        if ddp:
            collection = distributed.run_once(
                work,
                per_node=per_node,
                probe=FolderProbe(self.collect_in) if self.collect_in is not None else None,
                check=lambda c: all(all_match(p) for p in c.pins.values()),
                timeout=timeout,
                describe=describe,
                relay=_relay(self.collect_in),
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
                key: f"{_show_source(source, config.shown_query)}/{name}"
                for key, (source, name) in sorted(plan.items())
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
        shown = _show_source(source, config.shown_query)
        expected = parse_checksum(self.checksums[key], key=key) if key in self.checksums else None
        try:
            fetched = fetch_file(
                filename, source, self.collect_in, key + PARAMFILE_EXT, strategy, config, sha256=expected
            )
            shards = shard_names(fetched.path)
            if shards:
                # A sharded checkpoint's index: its shards live beside it in the source, and are
                # collected, several at a time, into <collect_in>/<key>.shards/ (see shard_folder_name);
                # with no collect_in they stay where they live, URL shards beside their index.
                parts = fetch_shards(
                    shards,
                    source,
                    filename.rpartition("/")[0],
                    self._shard_dir(key),
                    fetched.path,
                    strategy,
                    config,
                    desc=key,
                    on_failure=lambda error, name: _named_by_the_index(error, name, filename),
                )
                if expected is not None:  # the pin covers the shards too (see pl_pretrain._shards)
                    self._shard_pins[key] = pin_shards(
                        expected, dict(zip(shards, parts, strict=True)), self._shard_dir(key)
                    )
                return [fetched, *parts]
            return [fetched]
        except PretrainerError as error:
            error.with_context(key=key, source=shown)
            raise
        except Exception as error:  # anything unforeseen still names the key and the source
            raise FetchError(f"{type(error).__name__}: {error}", key=key, source=shown) from error

    def _check_pinned_shards(self, key: str, index: pathlib.Path, pinned: str) -> None:
        """Raises when a shard of the pinned index `key` differs from the digest recorded when it was collected."""
        names = shard_names(index)
        recorded = self._shard_pins.get(key) or recorded_shards(self._shard_dir(key), pinned)
        if names and recorded:  # a rank that sees no record (collect_in=None, not the fetcher) cannot check
            check_pinned_shards(recorded, {name: shard_path(index, name, self._shard_dir(key)) for name in names})

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
            self.collected = self._found_in_collect_in()
            self._pins, self._fetcher = {}, None

        def work() -> dict[str, TransferReport | None]:
            return {key: self._load_one(key, fetched) for key, fetched in self.collected.items()}

        reports = distributed.run_everywhere(work) if self._synchronised else work()
        self.reports = reports
        if log_report and distributed.global_rank() == 0:
            shown = self.shown_reports()
            table = format_reports(shown)
            incomplete = incomplete_keys(shown)
            warned = [key for key, report in shown.items() if report is not None and report.warnings]
            if incomplete or warned:
                logger.warning(
                    "Pretrained parameters did not load completely into %s, or their options matched nothing "
                    "(TransferOptions(strict=True) makes this an error):\n%s",
                    ", ".join(dict.fromkeys([*incomplete, *warned])),
                    table,
                )
            elif table:
                logger.info("Loaded pretrained parameters:\n%s", table)
        return reports

    def _found_in_collect_in(self) -> dict[str, Fetched]:
        if self.collect_in is None:
            raise ConfigurationError("Nothing was collected yet.", hint="Call collect_files() before load_collected().")
        found = {}
        for key in self.loadables:
            if not self.is_loadable(key):
                continue
            path = self.collect_in / (key + PARAMFILE_EXT)
            if not path.is_file():
                raise ConfigurationError(
                    f"'{path}' does not exist, and collect_files() was not called in this process.",
                    key=key,
                    hint="Call collect_files() (with internal_ddp_handling=True on every rank) before load_collected().",
                )
            found[key] = Fetched(
                path, FetchFrom.LOCAL, str(self.collect_in), path.name, str(path), size=path.stat().st_size
            )
        return found

    def _load_one(self, key: str, fetched: Fetched) -> TransferReport | None:
        obj = self.loadables[key]
        try:
            if key in self.checksums:
                # Verified again before loading: the file may have changed since it was collected.
                self._verify_before_loading(key, fetched)
                self._check_pinned_shards(key, fetched.path, parse_checksum(self.checksums[key], key=key))
            pins = self._pins.get(key, {})
            check_pinned(pins, fetched, self._fetcher, distributed.global_rank())
            result = self._call_hook(key, obj, fetched.path)
            # Checked again after: the bytes just loaded were the pinned ones (a replacement renames
            # over the path, and a file that was open keeps its bytes).
            check_pinned(pins, fetched, self._fetcher, distributed.global_rank())
        except PretrainerError as error:
            error.with_context(key=key, source=fetched.location)
            self._forget_unreadable(error, fetched)
            raise
        except Exception as error:  # a user's hook failing still names the key and the file
            raise TransferError(
                f"Loading '{fetched.path}' into {type(obj).__name__} failed: {type(error).__name__}: {error}",
                key=key,
                source=fetched.location,
            ) from error
        if isinstance(result, TransferReport):
            return result
        hook, _ = self._hook_for(key, obj)
        self._hooked[key] = TransferReport(source=fetched.path, hook=getattr(hook, "__qualname__", repr(hook)))
        return None

    def shown_reports(self) -> dict[str, TransferReport | None]:
        """Returns the last load's reports for the table: those of `load_collected`, with a row for each hook-loaded key.

        `load_collected` gives ``None`` for a loadable its own hook loaded (the hook reports nothing);
        here that key has a report naming the hook and the file, so the table shows every loadable.
        """
        return {key: self._hooked.get(key) if report is None else report for key, report in self.reports.items()}

    def _forget_unreadable(self, error: PretrainerError, fetched: Fetched) -> None:
        """A file this process just downloaded that cannot be parsed is removed with its record (else
        every later run would reuse it without a request and fail the same way)."""
        if not getattr(error, "unreadable", False) or fetched.reused or fetched.fetch_from is FetchFrom.LOCAL:
            return
        if not self._fetched_here:
            error.message += " The fetching rank removes it; the next collect_files() fetches it again."
            return
        fate = discard_unreadable(fetched)
        error.message += f" It was just downloaded from '{fetched.location}': {fate}."
        error.hint = (
            "The server sent something other than the checkpoint (a body cut short, an HTML login page, a "
            "compressed body): run again to fetch it again; if it fails again, check the address and credentials."
        )

    def _verify_before_loading(self, key: str, fetched: Fetched) -> None:
        expected = parse_checksum(self.checksums[key], key=key)
        if self._fetched_here:
            verify_sha256(fetched, expected, rehash=True)  # removes a bad file: this process placed it
            return
        # Only the process that placed a file removes it: removing it here would pull it from under
        # the ranks loading it, and hide this cause behind their "No such file".
        actual = file_sha256(fetched.path)
        if actual != expected:
            placer = "the rank that placed it" if self._fetcher is None else f"rank {self._fetcher}, which placed it,"
            raise ChecksumError(
                f"'{fetched.path}' changed after it was collected: it has sha256 {actual}, but sha256 {expected} "
                f"was expected; the file was left for {placer} to remove.",
                source=fetched.source,
                hint="The file was changed after it was fetched: fetch again, or update the pinned checksum.",
            )

    def _call_hook(self, key: str, obj: Any, path: pathlib.Path) -> Any:
        options = self.transfer_options.get(key)
        hook, kind = self._hook_for(key, obj)
        if hook is None:
            raise ConfigurationError(
                f"Don't know how to load a {type(obj).__module__}.{type(obj).__qualname__}.",
                key=key,
                hint="Pass custom_hooks={key: hook(obj, path)}, or decorate its class with "
                "@register_checkpoint_hooks and @mark_as_transfer.",
            )
        if kind == "custom":
            return hook(obj, path)
        if kind == "module":
            return hook(obj, path, options, shard_dir=self._shard_dir(key))
        if options is not None:
            raise ConfigurationError(
                f"transfer_options apply to torch.nn.Module loadables; '{key}' is a {type(obj).__name__}.",
                key=key,
            )
        if kind == "load":
            return hook(obj, path, False)
        return hook(obj, path)

    def _hook_for(self, key: str, obj: Any) -> tuple[Callable[..., Any] | None, str]:
        """Returns (the hook that loads `obj`, how it is called: "custom", "module", "transfer" or "load").

        The order: the key's custom hook; a transfer hook registered for the object's class (along
        its MRO); SpeechBrain's own hook for a class SpeechBrain knows; the module transfer; a load
        hook. ``(None, "")`` when there is none.
        """
        if key in self.custom_hooks:
            return self.custom_hooks[key], "custom"
        hook = get_default_hook(obj, DEFAULT_TRANSFER_HOOKS)
        if hook is None or hook is torch_parameter_transfer:
            # A class SpeechBrain knows (InputNormalization, CategoricalEncoder, its users' decorated
            # classes) loads with SpeechBrain's own hook, before the generic module transfer.
            hook = speechbrain_hook(obj) or hook
        if hook is torch_parameter_transfer:
            return hook, "module"
        if hook is not None:
            return hook, "transfer"
        hook = get_default_hook(obj, DEFAULT_LOAD_HOOKS)
        return hook, "load"

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


def _named_by_the_index(error: PretrainerError, shard: str, index: str) -> None:
    """A shard's name comes from its index, not from `paths`: the error says so, and what to check."""
    error.message = f"Shard '{shard}', which the sharded checkpoint's index '{index}' lists: {error.message}"
    if isinstance(error, FetchError) and not isinstance(error, (OfflineError, ChecksumError)):
        error.hint = (
            "The index names a shard its source does not hold: check that every shard listed in the index's "
            "weight_map was uploaded beside it (and the revision)."
        )


def _show_source(source: Source, shown_query: tuple[str, ...] = ()) -> str:
    try:
        fetch_from, text = guess_source(source)
    except PretrainerError:
        pinned = as_fetch_source(source)
        return os.fspath(cast("str | os.PathLike[str]", source)) if pinned is None else str(pinned.path)
    if fetch_from is FetchFrom.URI:
        return redact_url(text, shown_query)
    return text


def _shard_folder_of(key: str) -> str:
    return shard_folder_name(key + PARAMFILE_EXT)


def _relay(collect_in: pathlib.Path | None) -> CollectedFiles | None:
    """Returns how a collection travels to nodes that do not see `collect_in` (None: no folder to stream into)."""
    if collect_in is None:
        return None
    return CollectedFiles(collect_in, _shard_folder_of, lambda c: c.files, _received_collection)


def _received_collection(collection: _Collection, files: dict[str, Fetched]) -> _Collection:
    # This node's copies are pinned by what this node sees of them (its own inodes and times).
    pins: dict[str, dict[str, FileIdentity]] = {}
    for key, fetched in files.items():
        paths = [str(fetched.path)] + [p for p in collection.pins.get(key, {}) if p != str(collection.files[key].path)]
        pins[key] = {}
        for path in paths:
            with contextlib.suppress(OSError):  # not on this node: the check of the collected files fails for it
                pins[key][path] = FileIdentity.of(path, fetched.sha256 if path == str(fetched.path) else None)
    return _Collection(collection.fetcher, files, pins)


def _collect_arguments(
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
