"""Key selection and mapping: which file key fills which target key (include/exclude, key_map, a detected prefix).

Also the one guess at a key map for a load that left keys missing (`suggest_key_map`), shared by
the transfer's errors and warnings and by ``pl-pretrain plan``.
"""

from __future__ import annotations

import fnmatch
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from pl_pretrain.errors import ConfigurationError, TransferError
from pl_pretrain.transfer.options import KeyMap, TransferOptions
from pl_pretrain.transfer.speechbrain import LEGACY_KEY_RENAMES

__all__ = ["suggest_key_map", "key_map_hint"]  # the rest is private: the engine in `apply` calls it


def _legacy_renames(source: dict[str, torch.Tensor]) -> dict[str, str]:
    """Renames, in `source`, the keys old SpeechBrain checkpoints spell differently; returns file key -> new key.

    Applied before any other mapping, as SpeechBrain applies them on every load. A file that
    holds both spellings keeps both as they are.
    """
    renamed: dict[str, str] = {}
    for old, new in LEGACY_KEY_RENAMES.items():
        for key in [k for k in source if old in k]:
            name = key.replace(old, new)
            if name in source:
                continue
            source[name] = source.pop(key)
            original = next((first for first, now in renamed.items() if now == key), key)
            renamed[original] = name
    return renamed


def _selected(name: str, options: TransferOptions) -> bool:
    """True when target key `name` passes `include` and `exclude`."""
    if options.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in options.include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in options.exclude)


def _rename(
    source: Mapping[str, torch.Tensor], asked: list[str], options: TransferOptions, path: pathlib.Path
) -> tuple[dict[str, str], list[str], str, set[str]]:
    """Returns (target name -> file key, names left out on purpose, detected prefix, every mapped name).

    A file key left out by `include` / `exclude` is named as the target key it would have loaded;
    one that `key_map` (or the detected prefix) maps to nothing keeps the file's name. The mapped
    names (before `include` / `exclude`) are what those patterns are matched against, with the target's keys.
    """
    key_map = options.key_map
    prefix = ""
    if key_map is None:
        prefix = _detect_prefix(source, asked, path)
        key_map = {prefix: ""} if prefix else None
    mapper = _mapper(key_map)
    renamed: dict[str, str] = {}
    left_out: list[str] = []
    mapped: set[str] = set()
    for key in source:
        name = mapper(key)
        if name is not None and not isinstance(name, str):
            raise ConfigurationError(
                f"key_map returned {name!r} for '{key}' in '{path}'; it must return a key name or None.",
            )
        if name is not None:
            mapped.add(name)
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
    return renamed, left_out, prefix, mapped


def _unmatched_patterns(options: TransferOptions, names: Iterable[str]) -> list[str]:
    """Returns the `include` / `exclude` patterns that match none of `names`, as ``include='x'`` texts."""
    names = list(names)
    patterns = [("include", p) for p in options.include or ()] + [("exclude", p) for p in options.exclude]
    return [
        f"{field}={pattern!r}"
        for field, pattern in patterns
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names)
    ]


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
    """Returns the one prefix under which the file holds most of the target keys asked for, or "".

    Keys that match as they are win; otherwise a LightningModule checkpoint (``encoder.proj.weight``
    for a target ``encoder``) or a DDP one (``module.``) is recognised when one prefix covers more
    target keys than the names as they are, and more than half of them. Target keys the file lacks
    under it (a pooler that a classifier's checkpoint dropped) are then reported missing, as they
    would be without a prefix; two prefixes covering as many keys are never chosen between.
    """
    if not asked:
        return ""
    as_is = sum(1 for name in asked if name in source)
    if as_is == len(asked):
        return ""
    wanted = set(asked)
    covered: dict[str, int] = {}
    for key in source:
        # Every split of the key at a dot: "model.encoder.w" -> ("model.", "encoder.w"), ("model.encoder.", "w").
        dot = key.find(".")
        while dot != -1:
            if key[dot + 1 :] in wanted:
                covered[key[: dot + 1]] = covered.get(key[: dot + 1], 0) + 1
            dot = key.find(".", dot + 1)
    if not covered:
        return ""
    best = max(covered.values())
    if best <= as_is or best * 2 <= len(asked):
        return ""
    tied = sorted(p for p, n in covered.items() if n == best)
    if len(tied) > 1:
        raise TransferError(
            f"'{path}' holds the target keys under several prefixes ({', '.join(repr(p) for p in tied)}), "
            "so which one to load is ambiguous.",
            hint=f"Choose with TransferOptions(key_map={{{tied[0]!r}: ''}}).",
        )
    return tied[0]


def suggest_key_map(missing: Sequence[str], leftovers: Iterable[str]) -> tuple[str, str] | None:
    """Returns (file prefix, model prefix) when one renaming turns left-over file keys into most missing ones.

    Only the simplest renaming is guessed: a prefix added to or removed from whole names.
    `leftovers` are the file keys that loaded nowhere (a report's ``unexpected`` and ``excluded``).
    """
    if not missing:
        return None
    leftovers = list(leftovers)
    votes: dict[tuple[str, str], int] = {}
    for name in missing:
        for key in leftovers:
            if key.endswith("." + name):
                pair = (key[: -len(name)], "")
            elif name.endswith("." + key):
                pair = ("", name[: -len(key)])
            else:
                continue
            votes[pair] = votes.get(pair, 0) + 1
    if not votes:
        return None
    best, count = max(votes.items(), key=lambda item: item[1])
    return best if count * 2 >= len(missing) else None


def key_map_hint(missing: Sequence[str], leftovers: Iterable[str]) -> str:
    """Returns one sentence proposing `suggest_key_map`'s renaming as TransferOptions, or "" when there is none."""
    pair = suggest_key_map(missing, leftovers)
    if pair is None:
        return ""
    old, new = pair
    where = f"under the prefix '{old}'" if old else f"without the model's prefix '{new}'"
    return f"The missing keys are in the file {where}: try TransferOptions(key_map={{{old!r}: {new!r}}})."
