"""A local file -> an object.

Hooks are found by type along the MRO, as in SpeechBrain: `DEFAULT_TRANSFER_HOOKS` maps a class
to ``hook(obj, path)``, `DEFAULT_LOAD_HOOKS` to ``hook(obj, path, end_of_epoch)``. A class can
load itself with `register_checkpoint_hooks` and `mark_as_transfer` / `mark_as_loader`.

The default hook for ``torch.nn.Module``, `torch_parameter_transfer`, reads the file through a
memory map and copies each tensor once into the module's parameters, so a transfer adds almost no
private memory and ranks on one node share the page cache. It returns a `TransferReport` that says
exactly which keys were loaded, missing, unexpected or mismatched.

What it reads, found from the file's content (every collected file is called ``<key>.ckpt``):

- PyTorch files (``torch.save``: .ckpt .pt .pth .bin), zip or legacy; a dict holding a
  ``state_dict`` entry (a Lightning checkpoint) gives that entry; nested dicts of tensors are
  flattened to dotted names;
- ``.safetensors`` files;
- Hugging Face sharded checkpoints: a ``*.index.json`` whose ``weight_map`` names its shards
  (safetensors or torch files), looked up in ``<stem>.shards/`` beside the index, then beside the
  index, then beside the index's real location (through links).

Checkpoints are unpickled with ``weights_only=True``: a file that needs arbitrary code fails with
`UnsafeCheckpointError` naming the globals it wanted; `TransferOptions(weights_only=False)` opts in,
per loadable. There is never a silent fallback to unsafe loading.

This module knows nothing about ranks.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import json
import logging
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

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
    "plan_transfer",
    "diagnose_transfer",
    "format_reports",
    "format_bytes",
    "incomplete_keys",
    "detect_format",
    "read_state_dict",
    "shard_names",
    "shard_folder_name",
]

logger = logging.getLogger(__name__)

PathLike = str | pathlib.Path
KeyMap = Mapping[str, str] | Callable[[str], str | None]


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
        bytes: bytes copied into the target.
        excluded: keys left out on purpose by ``include`` / ``exclude`` / ``key_map`` or by the
            detected `prefix`: target keys keep their values, file keys are not read. Each is
            named as the target key when there is one, else as the file's key (outside the
            `key_map`). They never make a transfer incomplete.
        prefix: the prefix found in front of every target key in the file and stripped (e.g.
            ``"encoder."`` when the file is a LightningModule checkpoint and the target is its
            ``encoder``); ``""`` when keys matched as they are or a `key_map` was given.
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

    @property
    def complete(self) -> bool:
        """True when every target key asked for was loaded and nothing in the file was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """Returns one line: counts of loaded / missing / unexpected / mismatched (/ excluded) keys."""
        excluded = f", {len(self.excluded)} excluded" if self.excluded else ""
        prefix = f", prefix '{self.prefix}' stripped" if self.prefix else ""
        return (
            f"{len(self.loaded)} loaded, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} mismatched{excluded}{prefix} ({format_bytes(self.bytes)} from {self.source})"
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
            "excluded": list(self.excluded),
            "prefix": self.prefix,
        }


_ON_MISMATCH = ("error", "skip")


@dataclass(frozen=True, kw_only=True)
class TransferOptions:
    """How the default module transfer reads a file and maps and checks its keys (one per loadable).

    Every field is a keyword with a default, and the class can be built from a plain dict of its
    fields (``TransferOptions(**{"dtype": "bfloat16", "include": ["encoder.*"]})``), as LightningCLI
    YAML gives them.

    Keys go through three steps: the file's keys are renamed by `key_map` (or by the detected
    prefix), the renamed keys and the target's keys are filtered by `include` / `exclude`, and what
    is left is matched by name. Keys left out on purpose are reported as ``excluded``.

    Args:
        include: glob patterns (``fnmatch``, ``*`` crosses dots) on target key names; only keys
            matching one of them are loaded. ``None`` (default): every key. A string is one pattern.
        exclude: glob patterns on target key names never to load (the target keeps its values),
            e.g. ``["classifier.*"]`` for a head with another number of classes.
        key_map: how the file's keys become target keys. A mapping of prefixes, file prefix ->
            target prefix (ESPnet style), the longest matching prefix wins and file keys under no
            prefix are excluded: ``{"model.encoder.": ""}`` loads the file's encoder into an
            encoder module; ``{"": "encoder."}`` loads a bare encoder's file into a model's
            ``encoder``; add ``"": ""`` to keep the remaining keys under their own names. Or a
            callable ``file_key -> target_key``, returning ``None`` to drop a key. ``None``
            (default): keys as they are, unless no target key matches as is and every one of them
            appears in the file after one common prefix (a LightningModule attribute such as
            ``"encoder."``, DDP's ``"module."``): that prefix is stripped and reported. Give
            ``{"": ""}`` to turn this detection off.
        on_mismatch: what to do when a key asked for has another shape in the file. ``"error"``
            (default): raise a `TransferError` naming each key and both shapes, before anything
            is copied. ``"skip"``: keep the target's values for those keys and report them as
            ``mismatched``. Keys left out by ``include`` / ``exclude`` / ``key_map`` are never
            compared, so ``exclude=["classifier.*"]`` is the quiet way to keep a new head.
        strict: fail when anything asked for is missing, unexpected or mismatched (before anything
            is copied). Default ``False``: transfer what matches and report the rest.
        weights_only: unpickle with ``torch.load(weights_only=True)`` (default), which cannot run
            code from the file. ``False`` trusts the file to run arbitrary code: only for files you trust.
        mmap: read tensors through a memory map (default): nothing is copied but into the target,
            and ranks on one node share the page cache. ``False`` reads the whole file into private
            memory first (for filesystems where mmap is slow or unsupported).
        dtype: floating-point dtype for the target's floating-point parameters and buffers
            (``torch.bfloat16`` or ``"bfloat16"``); loaded tensors are allocated in that dtype and
            filled from the file tensor by tensor, without a second full copy. ``None`` (default):
            keep the target's dtypes (values are still converted to them).
        device: device for the target's parameters and buffers (``"cuda:0"``, ``torch.device``);
            loaded tensors are allocated there and filled straight from the file. ``None``
            (default): keep the target's devices. A target on the ``meta`` device needs a device.
    """

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    key_map: KeyMap | None = None
    on_mismatch: str = "error"
    strict: bool = False
    weights_only: bool = True
    mmap: bool = True
    dtype: torch.dtype | str | None = None
    device: torch.device | str | None = None

    def __post_init__(self) -> None:
        # Plain data from YAML (lists, strings) becomes the canonical types once, here.
        set_ = object.__setattr__
        if self.include is not None:
            set_(self, "include", _patterns("include", self.include))
        set_(self, "exclude", _patterns("exclude", self.exclude))
        if self.key_map is not None and not callable(self.key_map):
            if not isinstance(self.key_map, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.key_map.items()
            ):
                raise ConfigurationError(
                    f"TransferOptions(key_map={self.key_map!r}) is neither a mapping of prefixes (str -> str) nor a callable.",
                    hint='Give e.g. key_map={"model.encoder.": ""}, or a function file_key -> target_key or None.',
                )
            set_(self, "key_map", dict(self.key_map))
        if self.on_mismatch not in _ON_MISMATCH:
            raise ConfigurationError(
                f"TransferOptions(on_mismatch={self.on_mismatch!r}) must be one of {', '.join(map(repr, _ON_MISMATCH))}.",
                hint="'error' raises on a shape mismatch; 'skip' keeps the target's values and reports it.",
            )
        set_(self, "dtype", _as_dtype(self.dtype))
        set_(self, "device", _as_device(self.device))

    @classmethod
    def coerce(cls, value: TransferOptions | Mapping[str, Any] | None, *, key: str | None = None) -> TransferOptions:
        """Returns `value` as TransferOptions: itself, the defaults for None, or built from a dict of fields.

        Raises:
            ConfigurationError: an unknown field or a bad value, naming the loadable `key` when given.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        where = f"transfer_options['{key}']" if key is not None else "Transfer options"
        if not isinstance(value, Mapping):
            raise ConfigurationError(f"{where} is a {type(value).__name__}; give a TransferOptions or a dict.", key=key)
        try:
            return cls(**value)
        except TypeError as error:
            known = ", ".join(f.name for f in fields(cls))
            raise ConfigurationError(
                f"{where} has an unknown field: {error}.", key=key, hint=f"Known fields: {known}."
            ) from None
        except ConfigurationError as error:
            error.with_context(key=key)
            raise


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    patterns = tuple(value) if isinstance(value, Iterable) else None
    if patterns is not None and all(isinstance(p, str) for p in patterns):
        return patterns
    raise ConfigurationError(
        f"TransferOptions({name}={value!r}) must be a glob pattern or a list of them.",
        hint=f'Give e.g. {name}=["encoder.*"].',
    )


def _as_dtype(value: Any) -> torch.dtype | None:
    if value is None:
        return None
    dtype = value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ConfigurationError(
        f"TransferOptions(dtype={value!r}) is not a floating-point torch dtype.",
        hint='Give e.g. dtype="bfloat16", "float16", "float32" or torch.bfloat16.',
    )


def _as_device(value: Any) -> torch.device | None:
    if value is None:
        return None
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ConfigurationError(
            f"TransferOptions(device={value!r}) is not a device: {error}", hint='Give e.g. device="cpu" or "cuda:0".'
        ) from None


def format_bytes(n: int) -> str:
    """Returns a byte count for people: "512 B", "20.5 KiB", "1.0 GiB"."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def format_reports(reports: Mapping[str, TransferReport | None]) -> str:
    """Returns one readable table of the reports: a row per loadable, then each odd key listed once."""
    rows = [(key, r) for key, r in reports.items() if r is not None]
    if not rows:
        return ""
    header = ("loadable", "format", "loaded", "missing", "unexpected", "mismatched", "excluded", "size", "source")
    cells = [
        (
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
        for key, r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header) - 1)]

    def line(row: tuple[str, ...]) -> str:
        # Names left-aligned, numbers right-aligned; the source path last, unpadded.
        parts = [row[i].ljust(widths[i]) if i < 2 else row[i].rjust(widths[i]) for i in range(len(widths))]
        return "  ".join([*parts, row[-1]])

    lines = [line(header), *(line(row) for row in cells)]
    for key, r in rows:
        if r.prefix:
            lines.append(f"{key}: file keys read under the prefix '{r.prefix}' (detected and stripped)")
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
    return "\n".join(lines)


def incomplete_keys(reports: Mapping[str, TransferReport | None]) -> list[str]:
    """Returns the loadable keys whose report shows missing, unexpected or mismatched keys."""
    return [key for key, report in reports.items() if report is not None and not report.complete]


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
    for _name, method in vars(cls).items():
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
    """Returns "torch", "torch-legacy", "safetensors" or "index" from the file's first bytes, not its name.

    Raises:
        TransferError: the file is missing, empty, or none of these formats.
    """
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        size = path.stat().st_size
    except OSError as error:
        raise TransferError(f"Could not read '{path}': {error}") from error
    if not head:
        raise TransferError(
            f"'{path}' is empty, not a checkpoint.",
            hint="The file was truncated or never written; collect it again (FetchConfig(overwrite=True)).",
        )
    if head.startswith(_ZIP_MAGIC):
        return "torch"
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    if head.lstrip()[:1] == b"{" and _weight_map(path) is not None:
        return "index"
    if head[:1] == b"\x80":
        return "torch-legacy"  # a bare pickle: torch.save(_use_new_zipfile_serialization=False)
    raise TransferError(
        f"'{path}' is not a checkpoint pl_pretrain can read: it is neither a PyTorch file, "
        f"a safetensors file nor a sharded-checkpoint index (it starts with {head[:8]!r}).",
        hint="Check that the source file is a state dict; for another format pass a custom hook.",
    )


def read_state_dict(
    path: PathLike, options: TransferOptions | Mapping[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Returns (flat name -> tensor, format) for a checkpoint file; tensors are memory-mapped unless ``mmap=False``.

    The tensors may be views of a read-only, copy-on-write file mapping: copy from them, do not
    write into them. See `TransferReport.format` for the formats.

    Raises:
        UnsafeCheckpointError: the file needs arbitrary code to unpickle and ``weights_only`` is on.
        TransferError: the file is not a checkpoint, or a shard is missing or unreadable.
    """
    options = TransferOptions.coerce(options)
    path = pathlib.Path(path)
    fmt = detect_format(path)
    if fmt == "index":
        return _read_sharded(path, options)
    return _read_single(path, fmt, options)


def _read_single(path: pathlib.Path, fmt: str, options: TransferOptions) -> tuple[dict[str, torch.Tensor], str]:
    if fmt == "safetensors":
        return _read_safetensors(path, options), fmt
    try:
        obj = torch.load(
            str(path),
            map_location="cpu",
            weights_only=options.weights_only,
            # Only the zip format can be mapped; a legacy pickle is read into memory.
            mmap=options.mmap and fmt == "torch",
        )
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ... depending on the damage
        unsafe = _unsafe_error(path, error) if options.weights_only else None
        if unsafe is not None:
            raise unsafe from None
        members = _zip_members(path) if fmt == "torch" else None
        if members is not None and not any(name.endswith("data.pkl") for name in members):
            raise TransferError(
                f"'{path}' is a zip archive but not a PyTorch checkpoint (it holds {_few(members, 5)}).",
                hint="Check that the source file is a state dict saved by torch.save; for another format pass a custom hook.",
            ) from error
        raise TransferError(f"Could not read '{path}': {type(error).__name__}: {error}") from error
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        # A Lightning checkpoint (or any training checkpoint with a state_dict entry): the
        # optimizer states, loops and hyper-parameters beside it are not parameters.
        if "pytorch-lightning_version" in obj:
            fmt = "lightning"
        obj = obj["state_dict"]
    elif isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TransferError(
            f"'{path}' holds a {type(obj).__module__}.{type(obj).__qualname__}, not a state dict.",
            hint="Save `module.state_dict()`, or pass a custom hook that knows this object.",
        )
    state = _flatten(obj)
    if not state:
        raise TransferError(
            f"'{path}' holds a dict with no tensors in it (keys: {_few([str(k) for k in obj], 5)}).",
            hint="Check that the source file is a state dict; for another layout pass a custom hook.",
        )
    return state, fmt


def _zip_members(path: pathlib.Path) -> list[str] | None:
    """Returns the names in a zip archive, or None when it cannot be read as one."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None


def _read_safetensors(path: pathlib.Path, options: TransferOptions) -> dict[str, torch.Tensor]:
    import safetensors.torch

    try:
        if options.mmap:
            # safetensors maps the file; its tensors are views of the mapping, not copies.
            return safetensors.torch.load_file(str(path), device="cpu")
        return safetensors.torch.load(path.read_bytes())
    except Exception as error:  # SafetensorError, OSError, ValueError for a damaged header
        raise TransferError(
            f"Could not read '{path}' as safetensors: {type(error).__name__}: {error}",
            hint="The file is damaged or truncated; collect it again (FetchConfig(overwrite=True)).",
        ) from error


def _flatten(obj: Mapping[Any, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Returns the tensors of a (possibly nested) dict under dotted names; other values are not parameters."""
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
    return out


_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _unsafe_error(path: pathlib.Path, error: Exception) -> UnsafeCheckpointError | None:
    """Returns the error to raise when `error` is torch refusing a pickle under weights_only, else None."""
    text = str(error)
    if "Weights only load failed" not in text and "WeightsUnpickler" not in text:
        return None
    wanted: list[str] = []
    # Lists every global the file asks for, not only the first one torch tripped over; older
    # torch, or a legacy (non-zip) file, falls back on the message.
    with contextlib.suppress(Exception):
        wanted = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    if not wanted:
        wanted = _GLOBAL.findall(text)
    if wanted:
        what = f"the Python global{'s' if len(wanted) > 1 else ''} {', '.join(wanted)}"
        allow = f" If {'they are' if len(wanted) > 1 else 'it is'} a harmless class, torch.serialization.add_safe_globals([...]) allows just that."
    else:
        reason = next((line.strip() for line in text.splitlines() if "WeightsUnpickler" in line), text.splitlines()[0])
        what, allow = f"more than tensors ({reason})", ""
    return UnsafeCheckpointError(
        f"'{path}' needs {what} to load, and unpickling it could run code from the file; "
        f"pl_pretrain loads checkpoints with weights_only=True and did not run it.",
        hint="Only if you trust this file, allow it for this loadable: "
        "transfer_options={key: TransferOptions(weights_only=False)} (or {'weights_only': False})." + allow,
    )


# --------------------------------------------------------------------------------------------
# Sharded checkpoints (Hugging Face ``*.index.json`` + shards)
# --------------------------------------------------------------------------------------------


def shard_folder_name(collected_name: str) -> str:
    """Returns the folder name, beside a collected index file, that holds its shards.

    ``encoder.ckpt`` -> ``encoder.shards``: the Pretrainer collects shards there, and the transfer
    looks there first (then beside the index, then beside the index's real location).
    """
    return pathlib.Path(collected_name).stem + ".shards"


def _weight_map(path: pathlib.Path) -> dict[str, str] | None:
    """Returns an index file's ``weight_map`` (tensor name -> shard file name), or None if it is not an index."""
    try:
        with open(path, "rb") as f:
            if f.read(64).lstrip()[:1] != b"{":
                return None
            f.seek(0)
            index = json.load(f)
    except (OSError, ValueError):
        return None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        return None
    return {str(k): str(v) for k, v in weight_map.items()}


def shard_names(path: PathLike) -> list[str] | None:
    """Returns the shard file names a sharded-checkpoint index lists, or None if `path` is not an index."""
    path = pathlib.Path(path)
    weight_map = _weight_map(path)
    if weight_map is None:
        return None
    names = sorted(set(weight_map.values()))
    for name in names:
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise TransferError(
                f"Index '{path}' lists the shard {name!r}, which is not a plain file name.",
                hint="Shards must sit beside their index.",
            )
    return names


def _shard_path(index: pathlib.Path, name: str) -> pathlib.Path:
    """Returns where shard `name` of `index` is: the collected shard folder, beside the index, beside the real index."""
    places = [
        index.parent / shard_folder_name(index.name) / name,  # collected as <key>.shards/
        index.parent / name,  # read where it lives: a source folder, a Hub snapshot (NO_LINK)
        pathlib.Path(os.path.realpath(index)).parent / name,  # a link to the index in its source folder
    ]
    for place in places:
        if place.is_file():
            return place
    folders = list(dict.fromkeys(str(p.parent) for p in places))
    raise TransferError(
        f"Shard '{name}' of the sharded checkpoint '{index}' is in none of {', '.join(map(repr, folders))}.",
        hint="Collect the checkpoint again with the Pretrainer: it collects the shards into <key>.shards/ beside the index.",
    )


def _read_sharded(path: pathlib.Path, options: TransferOptions) -> tuple[dict[str, torch.Tensor], str]:
    weight_map = _weight_map(path) or {}
    state: dict[str, torch.Tensor] = {}
    formats = set()
    for name in shard_names(path) or []:
        shard = _shard_path(path, name)
        fmt = detect_format(shard)
        if fmt == "index":
            raise TransferError(f"Shard '{shard}' of '{path}' is itself an index.")
        tensors, fmt = _read_single(shard, fmt, options)
        formats.add("safetensors" if fmt == "safetensors" else "torch")
        listed = [k for k, v in weight_map.items() if v == name and k not in tensors]
        if listed:
            raise TransferError(
                f"The index '{path}' places {_few(listed, 5)} in '{shard}', which does not hold "
                f"{'them' if len(listed) > 1 else 'it'}: the index and its shards do not belong together.",
                hint="Collect the checkpoint again (FetchConfig(overwrite=True)).",
            )
        state.update(tensors)
    return state, "sharded-" + "+".join(sorted(formats))


# --------------------------------------------------------------------------------------------
# The default module transfer
# --------------------------------------------------------------------------------------------


def torch_parameter_transfer(
    obj: torch.nn.Module, path: PathLike, options: TransferOptions | Mapping[str, Any] | None = None
) -> TransferReport:
    """Returns the report of copying the checkpoint at `path` into `obj`'s parameters and buffers.

    The file is read through a memory map and each tensor is copied once, in place, into the
    target (converting to the target's dtype and device on the way), so the transfer adds almost
    no private memory. Names are mapped and filtered by `options` (see `TransferOptions`). Every
    check (shapes, strictness, ambiguous names) runs before the first copy: a transfer that fails
    leaves `obj` as it was. The report says what did not load; the Pretrainer logs it once per job.
    `plan_transfer` gives the same report without copying anything.

    Raises:
        TransferError: the file cannot be read, a key asked for has another shape (unless
            ``on_mismatch="skip"``), or ``strict=True`` and anything is missing, unexpected or
            mismatched. `UnsafeCheckpointError` when the file needs arbitrary code to unpickle.
        ConfigurationError: the options are invalid, or `key_map` sends two file keys to one target key.
    """
    options = TransferOptions.coerce(options)
    path = pathlib.Path(path)
    plan = _plan(obj, path, options)
    _check(obj, path, plan.report, options, plan.filled)
    return _apply(obj, plan, options)


def plan_transfer(
    obj: torch.nn.Module, path: PathLike, options: TransferOptions | Mapping[str, Any] | None = None
) -> TransferReport:
    """Returns the report `torch_parameter_transfer` would give, copying nothing (a dry run).

    The file is read (through a memory map: shapes and dtypes, not the tensors' bytes), the keys
    are mapped and matched and every check runs exactly as in the real transfer; `loaded` and
    `bytes` say what would be copied. `obj` is not changed.

    Raises:
        TransferError, ConfigurationError: whatever `torch_parameter_transfer` would raise.
    """
    report, error = diagnose_transfer(obj, path, options)
    if error is not None:
        raise error
    return report


def diagnose_transfer(
    obj: torch.nn.Module,
    path: PathLike,
    options: TransferOptions | Mapping[str, Any] | None = None,
    *,
    shapes_only: bool = False,
) -> tuple[TransferReport, TransferError | None]:
    """Returns (the report of a dry run, the error the real transfer would raise or None); copies nothing.

    Unlike `plan_transfer`, a failing check (a shape mismatch under ``on_mismatch="error"``,
    ``strict=True``) does not hide the report: it comes back with every key sorted, and the
    error beside it. `loaded` then lists the keys that match, although a real transfer would
    copy none of them. The error is the one the transfer raises, word for word.

    Args:
        shapes_only: `obj` was built only for its shapes (on the ``meta`` device, by a dry-run
            tool): its meta tensors are not counted as a failure.

    Raises:
        TransferError, ConfigurationError: the file cannot be read, or the keys cannot be mapped
            (these come before any report exists).
    """
    options = TransferOptions.coerce(options)
    path = pathlib.Path(path)
    plan = _plan(obj, path, options)
    plan.source = {}  # only names and shapes are needed from here on: release the file mappings
    report = plan.report
    error = None
    try:
        # Before `loaded` is filled, as in the real transfer, so that the messages are the same.
        _check(obj, path, report, options, plan.filled, meta=not shapes_only)
    except TransferError as failed:
        error = failed
    for name, _ in plan.pairs:
        tensor = plan.target[name]
        dtype = options.dtype if options.dtype is not None and tensor.is_floating_point() else tensor.dtype
        report.loaded.append(name)
        report.bytes += tensor.numel() * dtype.itemsize  # what `_apply` counts once the tensor is placed
    report.loaded.extend(plan.tied)
    return report, error


@dataclass
class _Plan:
    """What a transfer will do, before any check or copy.

    Attributes:
        report: the report so far: missing, unexpected, mismatched, excluded, prefix (not `loaded`).
        source: the file's tensors (memory-mapped), by file key.
        target: the target's tensors, by target key.
        pairs: (target key, file key) for each tensor to copy.
        tied: target keys filled through a tied tensor listed in `pairs`.
        filled: ids of the target tensors the file will fill.
    """

    report: TransferReport
    source: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor]
    pairs: list[tuple[str, str]]
    tied: list[str]
    filled: set[int]


def _plan(obj: torch.nn.Module, path: pathlib.Path, options: TransferOptions) -> _Plan:
    """Returns what a transfer of `path` into `obj` would do: reads the file, maps and matches the keys."""
    source, fmt = read_state_dict(path, options)
    target = {name: t for name, t in obj.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}
    report = TransferReport(source=path, format=fmt)
    asked = [name for name in target if _selected(name, options)]
    report.excluded.extend(name for name in target if not _selected(name, options))
    renamed, left_out, report.prefix = _rename(source, asked, options, path)
    shown = set(report.excluded)  # a file key and a target key often share a name: list it once
    report.excluded.extend(key for key in left_out if key not in shown)

    pairs: list[tuple[str, str]] = []
    for name in asked:
        key = renamed.get(name)
        if key is None:
            report.missing.append(name)
        elif tuple(source[key].shape) != tuple(target[name].shape):
            report.mismatched[name] = (tuple(source[key].shape), tuple(target[name].shape))
        else:
            pairs.append((name, key))
    # Tied weights (an embedding shared with an output layer): files often hold one name only
    # (safetensors refuses shared tensors), and filling that one fills the others.
    filled = {id(target[name]) for name, _ in pairs}
    tied = [name for name in report.missing if id(target[name]) in filled]
    report.missing = [name for name in report.missing if id(target[name]) not in filled]
    report.unexpected.extend(key for name, key in renamed.items() if name not in target)
    return _Plan(report, source, target, pairs, tied, filled)


def _apply(obj: torch.nn.Module, plan: _Plan, options: TransferOptions) -> TransferReport:
    """Returns the report after copying the planned tensors into `obj` (the checks have passed)."""
    report = plan.report
    with torch.no_grad():
        _place(obj, plan.filled, options)
        # Placement may have replaced buffers: copy into what the module holds now.
        target = obj.state_dict(keep_vars=True)
        for name, key in plan.pairs:
            tensor = target[name]
            tensor.copy_(plan.source[key])
            report.loaded.append(name)
            report.bytes += tensor.numel() * tensor.element_size()
    report.loaded.extend(plan.tied)
    plan.source = {}  # releases the file mappings now, not whenever the caller drops the plan
    return report


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


def _check(
    obj: torch.nn.Module,
    path: pathlib.Path,
    report: TransferReport,
    options: TransferOptions,
    loading: set[int],
    *,
    meta: bool = True,
) -> None:
    """Raises, before anything is copied, when the plan breaks the shape policy or strictness.

    `loading` holds the ids of the target tensors the file will fill. `meta`: also raise when
    tensors on the meta device would be left without values.
    """
    if report.mismatched and options.on_mismatch == "error":
        shapes = "; ".join(
            f"{k}: file {list(a)} vs model {list(b)}" for k, (a, b) in list(report.mismatched.items())[:10]
        )
        more = f" (and {len(report.mismatched) - 10} more)" if len(report.mismatched) > 10 else ""
        raise TransferError(
            f"'{path}' has other shapes than {type(obj).__name__} for {len(report.mismatched)} "
            f"key{'s' if len(report.mismatched) > 1 else ''}: {shapes}{more}. Nothing was loaded.",
            hint="To keep the model's values for them, exclude them (TransferOptions(exclude=[...])) "
            "or pass TransferOptions(on_mismatch='skip') to skip and report them.",
        )
    if options.strict and not report.complete:
        raise TransferError(
            f"Strict transfer from '{path}' into {type(obj).__name__} failed: {report.summary()}.{_details(report)} "
            "Nothing was loaded.",
            hint="Map the keys (TransferOptions key_map / include / exclude) or drop strict=True.",
        )
    on_meta = [
        name
        for name, tensor in _named_tensors(obj)
        if meta and tensor.is_meta and (options.device is None or id(tensor) not in loading)
    ]
    if on_meta:
        raise TransferError(
            f"{type(obj).__name__} has tensors on the meta device that this transfer would leave without "
            f"values: {_few(on_meta, 5)}.",
            hint="Give TransferOptions(device='cpu') (or another device) and a file that holds every such key.",
        )


def _details(report: TransferReport) -> str:
    parts = []
    if report.missing:
        parts.append(f"missing (kept their values): {_few(report.missing)}")
    if report.unexpected:
        parts.append(f"unexpected (not read): {_few(report.unexpected)}")
    if report.mismatched:
        parts.append(
            "mismatched (file vs model): "
            + _few([f"{k} {list(a)} vs {list(b)}" for k, (a, b) in report.mismatched.items()])
        )
    return "".join(f" {part}." for part in parts)


def _named_tensors(obj: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """Yields (state-dict style name, tensor) for every parameter and buffer, persistent or not."""
    for module_name, module in obj.named_modules():
        dot = module_name + "." if module_name else ""
        for leaf, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                yield dot + leaf, tensor


def _place(obj: torch.nn.Module, loading: set[int], options: TransferOptions) -> None:
    """Moves `obj`'s tensors to ``options.dtype`` / ``options.device``; those about to be loaded are only allocated.

    `loading` holds the ids of the tensors the file will fill.

    A tensor about to be filled from the file is never converted first (that would be a second
    full copy): it is replaced by an empty one that the copy then fills, one tensor at a time.
    """
    if options.dtype is None and options.device is None:
        return
    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(old) -> (old, new), for tied tensors
    for module in obj.modules():
        for slots in (module._parameters, module._buffers):
            for leaf, tensor in slots.items():
                if tensor is None:
                    continue
                if id(tensor) in replaced:
                    slots[leaf] = replaced[id(tensor)][1]
                    continue
                dtype = options.dtype if options.dtype is not None and tensor.is_floating_point() else tensor.dtype
                device = options.device if options.device is not None else tensor.device
                if tensor.dtype == dtype and tensor.device == device:
                    continue  # includes a tied parameter already placed under another name
                new = (
                    torch.empty(tensor.shape, dtype=dtype, device=device)
                    if id(tensor) in loading
                    else tensor.detach().to(dtype=dtype, device=device)
                )
                if isinstance(tensor, torch.nn.Parameter) and not tensor.is_meta:
                    tensor.data = new  # same Parameter object: optimizers and ties still see it
                    continue
                if isinstance(tensor, torch.nn.Parameter):
                    # A meta tensor cannot take real data in place; a new Parameter replaces it.
                    new = torch.nn.Parameter(new, requires_grad=tensor.requires_grad)
                replaced[id(tensor)] = (tensor, new)
                slots[leaf] = new


DEFAULT_TRANSFER_HOOKS[torch.nn.Module] = torch_parameter_transfer


def _torch_state_loader(obj: Any, path: PathLike, end_of_epoch: bool) -> None:
    obj.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))


for _cls in (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler):
    DEFAULT_LOAD_HOOKS[_cls] = _torch_state_loader
