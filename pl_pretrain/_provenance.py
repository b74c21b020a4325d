"""Provenance: what a run records of where its pretrained weights came from, for checkpoints and loggers.

`PretrainerCallback` keeps these records in every Lightning checkpoint (``state_dict``) and
sends them to the Trainer's loggers as hyperparameters; on a resume it compares the sources the
checkpoint was initialised from with the ones this run is configured with. No credential is
recorded: URLs go through `redact_url`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from typing import Any

from pl_pretrain.fetching import FetchConfig, redact_url
from pl_pretrain.pretrainer import Pretrainer
from pl_pretrain.transfer import TransferReport

__all__ = ["changed_sources", "configured_sources", "hyperparameters", "stamped"]


def configured_sources(
    pretrainer: Pretrainer, default_source: str | os.PathLike | None, fetch_config: FetchConfig
) -> dict[str, dict[str, Any]]:
    """Returns key -> the source `pretrainer` is configured to load it from (no credentials)."""
    out = {}
    for key in sorted(pretrainer.loadables):
        where = pretrainer.source_of(key, default_source)
        path = None
        if where is not None:
            source, filename = where
            source = str(getattr(source, "path", source))
            path = filename if source == "./" else f"{source.rstrip('/')}/{filename}"
        out[key] = {
            "path": redact_url(path, fetch_config.shown_query) if path is not None and "://" in path else path,
            "revision": fetch_config.revision,
            "checksum": pretrainer.checksums.get(key),
        }
    return out


def changed_sources(recorded: Mapping[str, Any], configured: Mapping[str, Any]) -> list[str]:
    """Returns the keys whose recorded source differs from the configured one (none when nothing was recorded)."""
    if not recorded or recorded == configured:
        return []
    return sorted(k for k in set(recorded) | set(configured) if recorded.get(k) != configured.get(k))


def stamped(provenance: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Returns `provenance` (`Pretrainer.provenance`) with the time of the load on each entry."""
    return {
        key: {**entry, "loaded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        for key, entry in provenance.items()
    }


def hyperparameters(
    provenance: Mapping[str, Mapping[str, Any]], reports: Mapping[str, TransferReport | None]
) -> dict[str, Any]:
    """Returns the flat ``pretrained/<key>/<field>`` hyperparameters that the loggers record for a load."""
    hparams = {}
    for key, entry in provenance.items():
        for field in ("location", "revision", "commit", "etag", "sha256"):
            if entry.get(field) is not None:
                hparams[f"pretrained/{key}/{field}"] = entry[field]
        report = reports.get(key)
        if report is not None:
            hparams[f"pretrained/{key}/loaded"] = len(report.loaded)
            hparams[f"pretrained/{key}/missing"] = len(report.missing)
            hparams[f"pretrained/{key}/unexpected"] = len(report.unexpected)
            hparams[f"pretrained/{key}/mismatched"] = len(report.mismatched)
    return hparams
