"""Loading: a collected file into its object, by the hook that fits it, checked before and after.

The machinery under `Pretrainer.load_collected`: which hook loads an object, the checks that a
file is still the one collected (its pinned sha256, its shards' digests), what happens to a file
just downloaded that cannot be parsed, and the table of reports in the log. The Pretrainer keeps
the vocabulary (keys, ``<key>.ckpt``) and the state of its collection; these functions are given
what they need.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pl_pretrain._constants import PARAMFILE_EXT
from pl_pretrain._shards import check_pinned_shards, recorded_shards
from pl_pretrain.errors import ChecksumError, ConfigurationError, PretrainerError
from pl_pretrain.fetching import Fetched, FetchFrom, discard_unreadable, file_sha256, verify_sha256
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

__all__ = [
    "call_hook",
    "check_shards_unchanged",
    "forget_unreadable",
    "found_in_collect_in",
    "hook_for",
    "hooked_report",
    "log_reports",
    "verify_unchanged",
]

# The logger keeps the Pretrainer's name: users filter the report table by it.
logger = logging.getLogger("pl_pretrain.pretrainer")


def found_in_collect_in(collect_in: pathlib.Path | None, keys: Iterable[str]) -> dict[str, Fetched]:
    """Returns key -> the ``<key>.ckpt`` already in `collect_in`, for a process that did not collect.

    Raises:
        ConfigurationError: there is no folder, or a key's file is not in it.
    """
    if collect_in is None:
        raise ConfigurationError("Nothing was collected yet.", hint="Call collect_files() before load_collected().")
    found = {}
    for key in keys:
        path = collect_in / (key + PARAMFILE_EXT)
        if not path.is_file():
            raise ConfigurationError(
                f"'{path}' does not exist, and collect_files() was not called in this process.",
                key=key,
                hint="Call collect_files() (with internal_ddp_handling=True on every rank) before load_collected().",
            )
        found[key] = Fetched(path, FetchFrom.LOCAL, str(collect_in), path.name, str(path), size=path.stat().st_size)
    return found


def verify_unchanged(fetched: Fetched, expected: str, *, fetched_here: bool, fetcher: int | None) -> None:
    """Raises `ChecksumError` when the collected file no longer has the pinned sha256 `expected`."""
    if fetched_here:
        verify_sha256(fetched, expected, rehash=True)  # removes a bad file: this process placed it
        return
    # Only the process that placed a file removes it: removing it here would pull it from under
    # the ranks loading it, and hide this cause behind their "No such file".
    actual = file_sha256(fetched.path)
    if actual != expected:
        placer = "the rank that placed it" if fetcher is None else f"rank {fetcher}, which placed it,"
        raise ChecksumError(
            f"'{fetched.path}' changed after it was collected: it has sha256 {actual}, but sha256 {expected} "
            f"was expected; the file was left for {placer} to remove.",
            source=fetched.source,
            hint="The file was changed after it was fetched: fetch again, or update the pinned checksum.",
        )


def check_shards_unchanged(
    index: pathlib.Path, pinned: str, pins: Mapping[str, str] | None, shard_dir: pathlib.Path | None
) -> None:
    """Raises when a shard of the pinned `index` differs from its digest recorded at collection.

    `pins` are the digests this process recorded as it collected; without them, those recorded in
    `shard_dir` for an index of sha256 `pinned`.
    """
    names = shard_names(index)
    recorded = pins or recorded_shards(shard_dir, pinned)
    if names and recorded:  # a rank that sees no record (collect_in=None, not the fetcher) cannot check
        check_pinned_shards(recorded, {name: shard_path(index, name, shard_dir) for name in names})


def forget_unreadable(error: PretrainerError, fetched: Fetched, *, fetched_here: bool) -> None:
    """Removes, with its record, a file this process just downloaded that cannot be parsed; says so in `error`.

    Else every later run would reuse it without a request and fail the same way.
    """
    if not getattr(error, "unreadable", False) or fetched.reused or fetched.fetch_from is FetchFrom.LOCAL:
        return
    if not fetched_here:
        error.message += " The fetching rank removes it; the next collect_files() fetches it again."
        return
    fate = discard_unreadable(fetched)
    error.message += f" It was just downloaded from '{fetched.location}': {fate}."
    error.hint = (
        "The server sent something other than the checkpoint (a body cut short, an HTML login page, a "
        "compressed body): run again to fetch it again; if it fails again, check the address and credentials."
    )


def hook_for(obj: Any, custom_hook: Callable[..., Any] | None) -> tuple[Callable[..., Any] | None, str]:
    """Returns (the hook that loads `obj`, how it is called: "custom", "module", "transfer" or "load").

    The order: the key's custom hook; a transfer hook registered for the object's class (along
    its MRO); SpeechBrain's own hook for a class SpeechBrain knows; the module transfer; a load
    hook. ``(None, "")`` when there is none.
    """
    if custom_hook is not None:
        return custom_hook, "custom"
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


def call_hook(
    key: str,
    obj: Any,
    path: pathlib.Path,
    custom_hook: Callable[..., Any] | None,
    options: TransferOptions | None,
    shard_dir: pathlib.Path | None,
) -> Any:
    """Returns what the hook that fits `obj` returns after loading `path` into it (a `TransferReport` for modules).

    Raises:
        ConfigurationError: no hook fits `obj`, or `options` were given for an object that is not a module.
    """
    hook, kind = hook_for(obj, custom_hook)
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
        return hook(obj, path, options, shard_dir=shard_dir)
    if options is not None:
        raise ConfigurationError(
            f"transfer_options apply to torch.nn.Module loadables; '{key}' is a {type(obj).__name__}.",
            key=key,
        )
    if kind == "load":
        return hook(obj, path, False)
    return hook(obj, path)


def hooked_report(obj: Any, custom_hook: Callable[..., Any] | None, path: pathlib.Path) -> TransferReport:
    """Returns the table's row for an object that its own hook loaded (such a hook reports nothing)."""
    hook, _ = hook_for(obj, custom_hook)
    return TransferReport(source=path, hook=getattr(hook, "__qualname__", repr(hook)))


def log_reports(shown: Mapping[str, TransferReport | None]) -> None:
    """Logs the reports as one table: at INFO when everything loaded, else one WARNING naming what did not."""
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
