"""TransferReport: what one transfer did, and the table that shows several of them to people."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pl_pretrain.transfer.keys import key_map_hint

__all__ = ["TransferReport", "format_bytes", "format_reports", "incomplete_keys"]


@dataclass
class TransferReport:
    """What one transfer did.

    Names in `loaded`, `missing` and `mismatched` are the target module's keys; names in
    `unexpected` are the file's own keys (before any mapping), so each can be found where it lives.

    Attributes:
        source: the file that was read (for a sharded checkpoint, its index).
        loaded: target keys that received a tensor.
        missing: target keys the file had nothing for (they keep their values).
        unexpected: file keys that matched no target key (they were not read).
        mismatched: target key -> (shape in the file, shape in the target), left untouched
            (only with ``on_mismatch="skip"``; the default raises instead).
        format: the file's format: "torch", "torch-legacy", "lightning", "safetensors",
            "sharded-safetensors" or "sharded-torch" (shards of both kinds: "sharded-safetensors+torch").
        bytes: bytes copied into the target; for a sharded (DTensor) target, the size of the
            full tensors, the same in every process.
        excluded: keys left out on purpose by ``include`` / ``exclude`` / ``key_map`` or by the
            detected `prefix`: target keys keep their values, file keys are not read. Each is
            named as the target key when there is one, else as the file's key (outside the
            `key_map`). They never make a transfer incomplete.
        prefix: the prefix found in front of every target key in the file and stripped (e.g.
            ``"encoder."`` when the file is a LightningModule checkpoint and the target is its
            ``encoder``); ``""`` when keys matched as they are or a `key_map` was given.
        local_bytes: bytes this process copied: `bytes` for a dense target, only the local
            shards' size for a sharded (DTensor) one.
        renamed: file key -> the name it was read under: old SpeechBrain spellings
            (``.mutihead_attn``, ``.convs_intermedite``) renamed before any other mapping, as
            SpeechBrain does. `unexpected` names such keys by their new name.
    """

    source: pathlib.Path
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    format: str = ""
    bytes: int = 0
    excluded: list[str] = field(default_factory=list)
    prefix: str = ""
    local_bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    hook: str = ""
    renamed: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when every target key asked for was loaded and nothing in the file was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """Returns one line: counts of loaded / missing / unexpected / mismatched (/ excluded) keys."""
        excluded = f", {len(self.excluded)} excluded" if self.excluded else ""
        prefix = f", prefix '{self.prefix}' stripped" if self.prefix else ""
        renamed = f", {len(self.renamed)} renamed" if self.renamed else ""
        return (
            f"{len(self.loaded)} loaded, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} mismatched{excluded}{prefix}{renamed} ({format_bytes(self.bytes)} from {self.source})"
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns the report as plain data (for checkpoints, loggers and JSON)."""
        return {
            "source": str(self.source),
            "format": self.format,
            "bytes": self.bytes,
            "local_bytes": self.local_bytes,
            "loaded": list(self.loaded),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": {k: [list(a), list(b)] for k, (a, b) in self.mismatched.items()},
            "excluded": list(self.excluded),
            "prefix": self.prefix,
            "warnings": list(self.warnings),
            "hook": self.hook,
            "renamed": dict(self.renamed),
        }

    def hint(self) -> str:
        """Returns the key map that would turn left-over file keys into the missing ones, as a sentence, or ""."""
        return key_map_hint(self.missing, [*self.unexpected, *self.excluded])


def format_bytes(n: int) -> str:
    """Returns a byte count for people: "512 B", "20.5 KiB", "1.0 GiB"."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def format_reports(reports: Mapping[str, TransferReport | None]) -> str:
    """Returns one readable table of the reports: a row per loadable, then each odd key listed once.

    A report with `hook` set (a loadable loaded by its own hook) gets a row that names the hook;
    ``None`` (nothing known about the load) gets none.
    """
    rows = [(key, r) for key, r in reports.items() if r is not None]
    if not rows:
        return ""
    header = ("loadable", "format", "loaded", "missing", "unexpected", "mismatched", "excluded", "size", "source")
    cells = [
        (
            (key, "hook", "-", "-", "-", "-", "-", "-", str(r.source))
            if r.hook
            else (
                key,
                r.format,
                str(len(r.loaded)),
                str(len(r.missing)),
                str(len(r.unexpected)),
                str(len(r.mismatched)),
                str(len(r.excluded)),
                format_bytes(r.bytes),
                str(r.source),
            )
        )
        for key, r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header) - 1)]

    def line(row: tuple[str, ...]) -> str:
        # Names left-aligned, numbers right-aligned; the source path last, unpadded.
        parts = [row[i].ljust(widths[i]) if i < 2 else row[i].rjust(widths[i]) for i in range(len(widths))]
        return "  ".join([*parts, row[-1]])

    lines = [line(header), *(line(row) for row in cells)]
    for key, r in rows:
        if r.hook:
            lines.append(f"{key}: loaded by its hook {r.hook} (pl_pretrain does not see which keys it set)")
        if r.prefix:
            lines.append(f"{key}: file keys read under the prefix '{r.prefix}' (detected and stripped)")
        if r.renamed:
            shown = [f"{old} -> {new}" for old, new in r.renamed.items()]
            lines.append(f"{key}: renamed (old SpeechBrain names): {_few(shown)}")
        if r.missing:
            lines.append(f"{key}: missing (kept their values): {_few(r.missing)}")
        if r.unexpected:
            lines.append(f"{key}: unexpected (not read): {_few(r.unexpected)}")
        for name, (src, dst) in list(r.mismatched.items())[:10]:
            lines.append(f"{key}: mismatched {name}: file {list(src)} vs model {list(dst)} (kept the model's)")
        if len(r.mismatched) > 10:
            lines.append(f"{key}: ... and {len(r.mismatched) - 10} more mismatched")
        if r.excluded:
            lines.append(f"{key}: excluded (left out on purpose): {_few(r.excluded)}")
        for warning in r.warnings:
            lines.append(f"{key}: warning: {warning}")
        if r.missing and r.hint():
            lines.append(f"{key}: hint: {r.hint()}")
    return "\n".join(lines)


def incomplete_keys(reports: Mapping[str, TransferReport | None]) -> list[str]:
    """Returns the loadable keys whose report shows missing, unexpected or mismatched keys."""
    return [key for key, report in reports.items() if report is not None and not report.complete]


def _few(keys: list[str], limit: int = 10) -> str:
    """Returns the first `limit` keys, comma-separated, and how many more there are (for messages)."""
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, ... ({len(keys) - limit} more)"
