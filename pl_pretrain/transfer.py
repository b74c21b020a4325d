"""A local file -> an object.

Hooks are found by type along the MRO, as in SpeechBrain: `DEFAULT_TRANSFER_HOOKS` maps a class
to ``hook(obj, path)``, `DEFAULT_LOAD_HOOKS` to ``hook(obj, path, end_of_epoch)``. A class can
load itself with `register_checkpoint_hooks` and `mark_as_transfer` / `mark_as_loader`.

The default hook for ``torch.nn.Module``, `torch_parameter_transfer`, reads the file through a
memory map and copies each tensor once into the module's parameters, so a transfer adds almost no
private memory and ranks on one node share the page cache. It returns a `TransferReport` that says
exactly which keys were loaded, missing, unexpected or mismatched.

This module knows nothing about ranks.
"""

from __future__ import annotations

import inspect
import logging
import pathlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

import torch

from pl_pretrain.errors import ConfigurationError, TransferError, UnsafeCheckpointError

__all__ = [
    "DEFAULT_TRANSFER_HOOKS",
    "DEFAULT_LOAD_HOOKS",
    "TransferReport",
    "TransferOptions",
    "mark_as_transfer",
    "mark_as_loader",
    "register_checkpoint_hooks",
    "get_default_hook",
    "torch_parameter_transfer",
    "format_reports",
    "shard_names",
    "shard_folder_name",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, pathlib.Path]


@dataclass
class TransferReport:
    """What one transfer did.

    Attributes:
        source: the file that was read.
        loaded: target keys that received a tensor.
        missing: target keys the file had nothing for (they keep their values).
        unexpected: file keys that matched no target key (they were ignored).
        mismatched: key -> (shape in the file, shape in the target), left untouched.
        format: the file's format ("torch", "safetensors", ...).
        bytes: bytes copied into the target.
    """

    source: pathlib.Path
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    format: str = ""
    bytes: int = 0

    @property
    def complete(self) -> bool:
        """True when every target key was loaded and nothing in the file was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """Returns one line: counts of loaded / missing / unexpected / mismatched keys."""
        return (
            f"{len(self.loaded)} loaded, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} mismatched ({_human(self.bytes)} from {self.source})"
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns the report as plain data (for checkpoints, loggers and JSON)."""
        return {
            "source": str(self.source),
            "format": self.format,
            "bytes": self.bytes,
            "loaded": list(self.loaded),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": {k: [list(a), list(b)] for k, (a, b) in self.mismatched.items()},
        }


@dataclass(frozen=True)
class TransferOptions:
    """How the default module transfer maps and checks keys (one per loadable).

    Args:
        strict: fail when anything is missing, unexpected or mismatched.
        weights_only: refuse pickles that need arbitrary code (the default, and safe).
        mmap: read tensors through a memory map (turn off on filesystems where mmap is slow).
    """

    strict: bool = False
    weights_only: bool = True
    mmap: bool = True


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def format_reports(reports: Mapping[str, "TransferReport | None"]) -> str:
    """Returns one readable table of the reports: a row per loadable, then each odd key listed once."""
    rows = [(key, r) for key, r in reports.items() if r is not None]
    if not rows:
        return ""
    width = max(len("loadable"), *(len(k) for k, _ in rows))
    lines = [f"{'loadable':<{width}}  {'loaded':>6}  {'missing':>7}  {'unexpected':>10}  {'mismatched':>10}  {'size':>9}  source"]
    for key, r in rows:
        lines.append(
            f"{key:<{width}}  {len(r.loaded):>6}  {len(r.missing):>7}  {len(r.unexpected):>10}  "
            f"{len(r.mismatched):>10}  {_human(r.bytes):>9}  {r.source}"
        )
    for key, r in rows:
        if r.missing:
            lines.append(f"{key}: missing (kept their values): {_few(r.missing)}")
        if r.unexpected:
            lines.append(f"{key}: unexpected (ignored): {_few(r.unexpected)}")
        for name, (src, dst) in list(r.mismatched.items())[:10]:
            lines.append(f"{key}: mismatched {name}: file {list(src)} vs model {list(dst)}")
        if len(r.mismatched) > 10:
            lines.append(f"{key}: ... and {len(r.mismatched) - 10} more mismatched")
    return "\n".join(lines)


def _few(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, ... ({len(keys) - limit} more)"


# --------------------------------------------------------------------------------------------
# Hook registries and decorators
# --------------------------------------------------------------------------------------------

DEFAULT_TRANSFER_HOOKS: dict[type, Callable[..., Any]] = {}
DEFAULT_LOAD_HOOKS: dict[type, Callable[..., Any]] = {}


def get_default_hook(obj: Any, registry: Mapping[type, Callable[..., Any]]) -> Callable[..., Any] | None:
    """Returns the hook registered for the nearest class of `obj` along its MRO, or None."""
    for cls in type(obj).__mro__:
        if cls in registry:
            return registry[cls]
    return None


def _check_signature(method: Callable[..., Any], args: tuple[str, ...], decorator: str) -> None:
    try:
        inspect.signature(method).bind(*args)
    except TypeError:
        raise ConfigurationError(
            f"@{decorator} needs a method callable as {method.__qualname__}({', '.join(args)}); "
            f"its signature is {inspect.signature(method)}.",
            hint=f"Define it as `def {method.__name__}({', '.join(args)}):`.",
        ) from None


def mark_as_transfer(method: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a method ``transfer(self, path)`` as its class's transfer hook (see `register_checkpoint_hooks`)."""
    _check_signature(method, ("self", "path"), "mark_as_transfer")
    method._pl_pretrain_transfer = True  # type: ignore[attr-defined]
    return method


def mark_as_loader(method: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a method ``loader(self, path, end_of_epoch)`` as its class's load hook."""
    _check_signature(method, ("self", "path", "end_of_epoch"), "mark_as_loader")
    method._pl_pretrain_loader = True  # type: ignore[attr-defined]
    return method


def register_checkpoint_hooks(cls: type) -> type:
    """Class decorator: registers the class's `mark_as_transfer` / `mark_as_loader` methods as default hooks."""
    found = False
    for name, method in vars(cls).items():
        if getattr(method, "_pl_pretrain_transfer", False):
            DEFAULT_TRANSFER_HOOKS[cls] = method
            found = True
        if getattr(method, "_pl_pretrain_loader", False):
            DEFAULT_LOAD_HOOKS[cls] = method
            found = True
    if not found:
        raise ConfigurationError(
            f"@register_checkpoint_hooks found no @mark_as_transfer or @mark_as_loader method on {cls.__qualname__}.",
            hint="Decorate the method that loads the object's state.",
        )
    return cls


# --------------------------------------------------------------------------------------------
# Reading checkpoint files
# --------------------------------------------------------------------------------------------

_ZIP_MAGIC = b"PK\x03\x04"


def detect_format(path: PathLike) -> str:
    """Returns "torch", "torch-legacy" or "safetensors" from the file's first bytes, not its name."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as error:
        raise TransferError(f"Could not read '{path}': {error}", source=str(path)) from error
    if not head:
        raise TransferError(
            f"'{path}' is empty.", source=str(path), hint="The file was truncated; collect it again (overwrite=True)."
        )
    if head.startswith(_ZIP_MAGIC):
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len < path.stat().st_size:
            return "safetensors"
    if head[:1] == b"\x80":
        return "torch-legacy"
    raise TransferError(
        f"'{path}' is not a checkpoint pl_pretrain can read (it is neither a PyTorch zip file nor safetensors).",
        source=str(path),
        hint="Check that the source file is a state dict; for another format pass a custom hook.",
    )


def read_state_dict(path: PathLike, options: TransferOptions | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Returns (flat name -> tensor, format) for a checkpoint file; tensors are memory-mapped when possible."""
    options = options or TransferOptions()
    path = pathlib.Path(path)
    fmt = detect_format(path)
    if fmt == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), fmt
    try:
        obj = torch.load(
            str(path), map_location="cpu", weights_only=options.weights_only, mmap=options.mmap and fmt == "torch"
        )
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ... for unsafe globals
        text = str(error)
        if options.weights_only and ("Weights only load failed" in text or "weights_only" in text):
            raise UnsafeCheckpointError(
                f"'{path}' needs arbitrary Python code to load, which weights_only loading refuses: "
                f"{text.splitlines()[0] if text else type(error).__name__}",
                source=str(path),
                hint="Only if you trust this file, allow it for this loadable with TransferOptions(weights_only=False).",
            ) from None
        raise TransferError(f"Could not read '{path}': {type(error).__name__}: {error}", source=str(path)) from error
    state = _state_dict_of(obj, path)
    return state, fmt


def _state_dict_of(obj: Any, path: pathlib.Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise TransferError(
            f"'{path}' holds a {type(obj).__name__}, not a state dict.",
            source=str(path),
            hint="Save `module.state_dict()`, or pass a custom hook that knows this object.",
        )
    return dict(obj)


# --------------------------------------------------------------------------------------------
# Sharded checkpoints (Hugging Face ``*.index.json`` + shards)
# --------------------------------------------------------------------------------------------


def shard_folder_name(collected_name: str) -> str:
    """Returns the folder name, beside a collected index file, that holds its shards.

    ``encoder.ckpt`` -> ``encoder.shards``: the Pretrainer collects shards there, and the transfer
    looks there first (then beside the index's real location).
    """
    return pathlib.Path(collected_name).stem + ".shards"


def shard_names(path: PathLike) -> list[str] | None:
    """Returns the shard file names a sharded-checkpoint index lists, or None if `path` is not an index."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(1)
            if head != b"{":
                return None
            f.seek(0)
            import json

            index = json.load(f)
    except (OSError, ValueError):
        return None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        return None
    names = sorted(set(map(str, weight_map.values())))
    for name in names:
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise TransferError(
                f"Index '{path}' lists the shard {name!r}, which is not a plain file name.",
                source=str(path),
                hint="Shards must sit beside their index.",
            )
    return names


# --------------------------------------------------------------------------------------------
# The default module transfer
# --------------------------------------------------------------------------------------------


def torch_parameter_transfer(obj: torch.nn.Module, path: PathLike, options: TransferOptions | None = None) -> TransferReport:
    """Returns the report of copying the checkpoint at `path` into `obj`'s parameters and buffers.

    Tensors whose names and shapes match are copied in place (into the target's dtype and device);
    the rest is reported, not loaded. With ``strict=True`` anything unloaded is an error.
    """
    options = options or TransferOptions()
    path = pathlib.Path(path)
    source, fmt = read_state_dict(path, options)
    target = obj.state_dict(keep_vars=True)
    report = TransferReport(source=path, format=fmt)
    with torch.no_grad():
        for name, tensor in target.items():
            if name not in source:
                report.missing.append(name)
                continue
            value = source[name]
            if not isinstance(value, torch.Tensor):
                report.unexpected.append(name)
                continue
            if tuple(value.shape) != tuple(tensor.shape):
                report.mismatched[name] = (tuple(value.shape), tuple(tensor.shape))
                continue
            tensor.copy_(value)
            report.loaded.append(name)
            report.bytes += tensor.numel() * tensor.element_size()
    report.unexpected.extend(k for k in source if k not in target)
    if options.strict and not report.complete:
        raise TransferError(
            f"Strict transfer from '{path}' into {type(obj).__name__} failed: {report.summary()}. "
            f"Missing: {report.missing[:5]}, unexpected: {report.unexpected[:5]}, mismatched: {list(report.mismatched)[:5]}.",
            source=str(path),
            hint="Map the keys (TransferOptions) or drop strict=True.",
        )
    return report


DEFAULT_TRANSFER_HOOKS[torch.nn.Module] = torch_parameter_transfer


def _torch_state_loader(obj: Any, path: PathLike, end_of_epoch: bool) -> None:
    obj.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))


for _cls in (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler):
    DEFAULT_LOAD_HOOKS[_cls] = _torch_state_loader
