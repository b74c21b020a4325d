"""Readers: a checkpoint file (torch, Lightning, safetensors, a sharded index and its shards) -> flat name -> tensor.

The format is found from the file's content, not its name (every collected file is called
``<key>.ckpt``). Tensors are memory-mapped unless ``TransferOptions(mmap=False)``. Pickles are
read with ``weights_only=True`` unless the options opt out, and a refusal names what the file wanted.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch

from pl_pretrain.errors import TransferError, UnsafeCheckpointError
from pl_pretrain.transfer.options import PathLike, TransferOptions
from pl_pretrain.transfer.report import _few

__all__ = ["detect_format", "read_state_dict", "shard_names", "shard_path"]

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
        raise _unreadable(
            TransferError(
                f"'{path}' is empty, not a checkpoint.",
                hint="The file was truncated or never written; collect it again (FetchConfig(overwrite=True)).",
            )
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
    raise _unreadable(
        TransferError(
            f"'{path}' is not a checkpoint pl_pretrain can read: it is neither a PyTorch file, "
            f"a safetensors file nor a sharded-checkpoint index (it starts with {head[:8]!r}).",
            hint="Check that the source file is a state dict; for another format pass a custom hook.",
        )
    )


def read_state_dict(
    path: PathLike,
    options: TransferOptions | Mapping[str, Any] | None = None,
    *,
    shard_dir: PathLike | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """Returns (flat name -> tensor, format) for a checkpoint file; tensors are memory-mapped unless ``mmap=False``.

    The tensors may be views of a read-only, copy-on-write file mapping: copy from them, do not
    write into them. See `TransferReport.format` for the formats.

    Args:
        shard_dir: for a sharded checkpoint's index, the folder its shards were collected into,
            looked in first (the Pretrainer passes ``<collect_in>/<key>.shards``). Then, as always,
            the shards are looked for beside the index, then beside its real location (through links).

    Raises:
        UnsafeCheckpointError: the file needs arbitrary code to unpickle and ``weights_only`` is on.
        TransferError: the file is not a checkpoint, or a shard is missing or unreadable.
    """
    options = TransferOptions.coerce(options)
    path = pathlib.Path(path)
    fmt = detect_format(path)
    if fmt == "index":
        return _read_sharded(path, options, None if shard_dir is None else pathlib.Path(shard_dir))
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
        raise _unreadable(TransferError(f"Could not read '{path}': {type(error).__name__}: {error}")) from error
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


def _unreadable(error: TransferError) -> TransferError:
    """Marks an error caused by the file's bytes (empty, cut short, damaged, not a checkpoint at all),
    as opposed to its content (no state dict, unsafe pickle): the fetcher may remove and fetch it again."""
    error.unreadable = True  # type: ignore[attr-defined]
    return error


def _read_safetensors(path: pathlib.Path, options: TransferOptions) -> dict[str, torch.Tensor]:
    import safetensors.torch

    try:
        if options.mmap:
            # safetensors maps the file; its tensors are views of the mapping, not copies.
            return safetensors.torch.load_file(str(path), device="cpu")
        return safetensors.torch.load(path.read_bytes())
    except Exception as error:  # SafetensorError, OSError, ValueError for a damaged header
        raise _unreadable(
            TransferError(
                f"Could not read '{path}' as safetensors: {type(error).__name__}: {error}",
                hint="The file is damaged or truncated; collect it again (FetchConfig(overwrite=True)).",
            )
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
    # torch.load(weights_only=True) re-raises every refusal of its unpickler as UnpicklingError
    # (torch/serialization.py); other damage comes as RuntimeError, EOFError, zip errors, ...
    if not isinstance(error, pickle.UnpicklingError):
        return None
    text = str(error)
    wanted: list[str] = []
    # Lists every global the file asks for, not only the first one torch tripped over. torch has
    # no API that lists them for a legacy (non-zip) file: that one falls back on the message.
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


def shard_path(index: pathlib.Path, name: str, shard_dir: pathlib.Path | None) -> pathlib.Path:
    """Returns where shard `name` of `index` is: in `shard_dir` when given, beside the index, beside the real index."""
    places = [
        index.parent / name,  # read where it lives: a source folder, a Hub snapshot (NO_LINK)
        pathlib.Path(os.path.realpath(index)).parent / name,  # a link to the index in its source folder
    ]
    if shard_dir is not None:
        places.insert(0, shard_dir / name)  # where the caller collected them (the Pretrainer: <key>.shards/)
    for place in places:
        if place.is_file():
            return place
    folders = list(dict.fromkeys(str(p.parent) for p in places))
    raise TransferError(
        f"Shard '{name}' of the sharded checkpoint '{index}' is in none of {', '.join(map(repr, folders))}.",
        hint="Collect the checkpoint again with the Pretrainer: it collects the shards into <key>.shards/ beside the index.",
    )


def _read_sharded(
    path: pathlib.Path, options: TransferOptions, shard_dir: pathlib.Path | None
) -> tuple[dict[str, torch.Tensor], str]:
    """Returns (every shard's tensors, "sharded-<formats>") for the index at `path`."""
    weight_map = _weight_map(path) or {}
    state: dict[str, torch.Tensor] = {}
    formats = set()
    for name in shard_names(path) or []:
        shard = shard_path(path, name, shard_dir)
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
        # A tensor in two shards would be overridden by whichever is read last: the index says
        # where each one lives, and a shard holding it as well is not part of this checkpoint.
        elsewhere = [k for k in tensors if weight_map.get(k, name) != name or k in state]
        if elsewhere:
            where = weight_map.get(elsewhere[0]) or "another shard"
            raise TransferError(
                f"Shard '{shard}' of '{path}' holds {_few(elsewhere, 5)}, which the index places in "
                f"'{where}': the index and its shards do not belong together, and loading would pick one at random.",
                hint="Collect the checkpoint again (FetchConfig(overwrite=True)), or fix the index's weight_map.",
            )
        state.update(tensors)
    return state, "sharded-" + "+".join(sorted(formats))
