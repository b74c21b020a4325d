"""Reading a LightningCLI config: its PretrainerCallback entries, and the fetch jobs they describe.

Only what the commands need is read, with PyYAML: the config is not instantiated (no Lightning,
no jsonargparse), so a job's config can be checked and fetched for on a login node. A config that
does not say what the commands need is a `UsageError` (exit code 2).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pl_pretrain._constants import DEFAULT_COLLECT_IN
from pl_pretrain.cli._common import UsageError, _existing_file
from pl_pretrain.fetching import FetchConfig, LocalStrategy


def _read_yaml(text: str) -> dict[str, Any]:
    """Returns a YAML config file as a dict; a missing or malformed file is a usage error."""
    import yaml

    path = _existing_file(text, "Config file")
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"Could not read the config file '{text}': {error}") from None
    except yaml.YAMLError as error:
        raise UsageError(f"'{text}' is not valid YAML: {error}") from None
    if not isinstance(config, dict):
        raise UsageError(f"'{text}' holds a {type(config).__name__}, not a LightningCLI config (a mapping).")
    return config


def _pretrainer_callbacks(config: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """Returns the init_args of every ``trainer.callbacks`` entry whose class_path ends in PretrainerCallback."""
    trainer = config.get("trainer")
    callbacks = trainer.get("callbacks") if isinstance(trainer, dict) else None
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    found = []
    for entry in callbacks or []:
        if isinstance(entry, dict) and str(entry.get("class_path", "")).rsplit(".", 1)[-1] == "PretrainerCallback":
            init_args = entry.get("init_args") or {}
            if not isinstance(init_args, dict):
                raise UsageError(
                    f"{where}: a PretrainerCallback's init_args is a {type(init_args).__name__}, not a mapping."
                )
            found.append(init_args)
    if not found:
        raise UsageError(
            f"{where} has no PretrainerCallback in trainer.callbacks "
            "(an entry with class_path: pl_pretrain.PretrainerCallback)."
        )
    return found


def _mapping(init_args: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    value = init_args.get(name) or {}
    if not isinstance(value, dict):
        raise UsageError(f"{where}: PretrainerCallback {name} is a {type(value).__name__}, not a mapping.")
    return dict(value)


def _loadables_of(config: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (key -> attribute, key -> transfer_options) over every PretrainerCallback of a config."""
    loadables: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for init_args in _pretrainer_callbacks(config, where):
        for key, attribute in _mapping(init_args, "loadables", where).items():
            if key in loadables:
                raise UsageError(f"{where}: two PretrainerCallbacks load the key '{key}'.")
            loadables[key] = attribute
        options.update(_mapping(init_args, "transfer_options", where))
    return loadables, options


@dataclass
class FetchJob:
    """One Pretrainer's worth of files to collect (a command line, or one callback of a config)."""

    collect_in: pathlib.Path | None
    keys: list[str]
    paths: dict[str, str]
    default_source: str | None = None
    checksums: dict[str, str] = dataclasses.field(default_factory=dict)
    conditions: dict[str, bool] = dataclasses.field(default_factory=dict)
    strategy: LocalStrategy = LocalStrategy.SYMLINK
    config: FetchConfig = dataclasses.field(default_factory=FetchConfig)


def _jobs_from_config(text: str) -> list[FetchJob]:
    config = _read_yaml(text)
    jobs = []
    for init_args in _pretrainer_callbacks(config, f"'{text}'"):
        where = f"'{text}'"
        keys = list(_mapping(init_args, "loadables", where))
        if not keys:
            raise UsageError(f"{where}: a PretrainerCallback has no loadables, so nothing to fetch.")
        collect_in = init_args.get("collect_in", DEFAULT_COLLECT_IN)
        strategy = init_args.get("local_strategy", "SYMLINK")
        name = str(strategy).rsplit(".", 1)[-1].upper()
        if name not in LocalStrategy.__members__:
            raise UsageError(
                f"{where}: local_strategy {strategy!r} is not one of {', '.join(LocalStrategy.__members__)}."
            )
        jobs.append(
            FetchJob(
                collect_in=None if collect_in is None else pathlib.Path(str(collect_in)),
                keys=keys,
                paths={key: str(value) for key, value in _mapping(init_args, "paths", where).items()},
                default_source=None if init_args.get("default_source") is None else str(init_args["default_source"]),
                checksums={key: str(value) for key, value in _mapping(init_args, "checksums", where).items()},
                conditions={k: v for k, v in _mapping(init_args, "conditions", where).items() if isinstance(v, bool)},
                strategy=LocalStrategy[name],
                config=_fetch_config(init_args.get("fetch_config"), where),
            )
        )
    return jobs


def _fetch_config(value: Any, where: str) -> FetchConfig:
    """Returns the FetchConfig a config's ``fetch_config`` entry describes (fields, or class_path + init_args)."""
    if value is None:
        return FetchConfig()
    if isinstance(value, dict) and "class_path" in value:
        value = value.get("init_args") or {}
    if not isinstance(value, dict):
        raise UsageError(f"{where}: fetch_config is a {type(value).__name__}, not a mapping of FetchConfig fields.")
    try:
        return FetchConfig(**value)
    except TypeError as error:
        known = ", ".join(f.name for f in dataclasses.fields(FetchConfig))
        raise UsageError(f"{where}: fetch_config: {error} (FetchConfig fields: {known}).") from None
