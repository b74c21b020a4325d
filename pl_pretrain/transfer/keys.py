"""Key selection and mapping: which file key fills which target key (include/exclude, key_map, a detected prefix)."""

from __future__ import annotations

import fnmatch
import pathlib
from collections.abc import Callable, Mapping

import torch

from pl_pretrain.errors import ConfigurationError, TransferError
from pl_pretrain.transfer.options import KeyMap, TransferOptions

__all__: list[str] = []  # private to pl_pretrain.transfer: the engine in `apply` calls these


def _selected(name: str, options: TransferOptions) -> bool:
    """True when target key `name` passes `include` and `exclude`."""
    if options.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in options.include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in options.exclude)


def _rename(
    source: Mapping[str, torch.Tensor], asked: list[str], options: TransferOptions, path: pathlib.Path
) -> tuple[dict[str, str], list[str], str]:
    """Returns (target name -> file key, names left out on purpose, detected prefix).

    A file key left out by `include` / `exclude` is named as the target key it would have loaded;
    one that `key_map` (or the detected prefix) maps to nothing keeps the file's name.
    """
    key_map = options.key_map
    prefix = ""
    if key_map is None:
        prefix = _detect_prefix(source, asked, path)
        key_map = {prefix: ""} if prefix else None
    mapper = _mapper(key_map)
    renamed: dict[str, str] = {}
    left_out: list[str] = []
    for key in source:
        name = mapper(key)
        if name is not None and not isinstance(name, str):
            raise ConfigurationError(
                f"key_map returned {name!r} for '{key}' in '{path}'; it must return a key name or None.",
            )
        if name is None:
            left_out.append(key)
        elif not _selected(name, options):
            left_out.append(name)  # under the target's name, as the target's own excluded keys are
        elif name in renamed:
            raise ConfigurationError(
                f"key_map sends both '{renamed[name]}' and '{key}' of '{path}' to the target key '{name}'.",
                hint="Make the mapping one-to-one (longer prefixes win), or drop one of them.",
            )
        else:
            renamed[name] = key
    return renamed, left_out, prefix


def _mapper(key_map: KeyMap | None) -> Callable[[str], str | None]:
    """Returns file key -> target key (None: left out) for a key_map."""
    if key_map is None:
        return lambda key: key
    if callable(key_map):
        return key_map
    prefixes = sorted(key_map.items(), key=lambda item: len(item[0]), reverse=True)

    def by_prefix(key: str) -> str | None:
        for old, new in prefixes:
            if key.startswith(old):
                return new + key[len(old) :]
        return None

    return by_prefix


def _detect_prefix(source: Mapping[str, torch.Tensor], asked: list[str], path: pathlib.Path) -> str:
    """Returns the one prefix under which the file holds every target key asked for, or "".

    Keys that match as they are win; otherwise a LightningModule checkpoint (``encoder.proj.weight``
    for a target ``encoder``) or a DDP one (``module.``) is recognised when exactly one prefix
    covers every target key. Partial matches are never guessed at.
    """
    if not asked or all(name in source for name in asked):
        return ""
    first = asked[0]
    candidates = {key[: -len(first)] for key in source if key.endswith("." + first)}
    complete = sorted(p for p in candidates if all(p + name in source for name in asked))
    if len(complete) > 1:
        raise TransferError(
            f"'{path}' holds every target key under several prefixes ({', '.join(repr(p) for p in complete)}), "
            "so which one to load is ambiguous.",
            hint=f"Choose with TransferOptions(key_map={{{complete[0]!r}: ''}}).",
        )
    return complete[0] if complete else ""
