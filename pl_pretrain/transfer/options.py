"""TransferOptions: how the default module transfer reads a file and maps and checks its keys.

The options arrive as plain data from YAML or as the dataclass; they are coerced to canonical
types once, here, so that the readers, the key mapping and the apply step trust them.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from pl_pretrain.errors import ConfigurationError

__all__ = ["TransferOptions", "PathLike", "KeyMap"]

PathLike = str | pathlib.Path
"""What every function of `pl_pretrain.transfer` accepts for a file or a folder."""

KeyMap = Mapping[str, str] | Callable[[str], str | None]
"""`TransferOptions.key_map`: file prefix -> target prefix, or a function file key -> target key or None."""

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
        strict: fail when anything asked for is missing, unexpected or mismatched, or when an
            `include` / `exclude` pattern matches no key (before anything is copied). Default
            ``False``: transfer what matches and report the rest; a pattern that matches nothing
            is a warning in the report.
        allow_empty: accept a transfer that copies no tensor at all into a module that has some.
            Default ``False``: that is a `TransferError` (a file whose keys match none of the
            module's, an ``include`` that matches nothing, ``exclude=["*"]``), with the key map
            that would make them match when one can be guessed. Set it when loading nothing is
            what you mean (a file that may or may not hold this part).
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
    allow_empty: bool = False
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
