"""`pl-pretrain inspect`: what a checkpoint file holds, read through the transfer's memory-mapped reader."""

from __future__ import annotations

import argparse
import fnmatch
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from pl_pretrain.cli._common import EXIT_OK, _count, _existing_file, _print_json, _print_table, _subparser
from pl_pretrain.fetching import file_sha256
from pl_pretrain.pretrainer import shard_folder_name
from pl_pretrain.transfer import detect_format, format_bytes, read_state_dict, shard_names

__all__ = ["describe_checkpoint", "run_inspect"]

# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------

INSPECT_DESCRIPTION = """\
Show what a checkpoint file holds: its format, its tensors' names, shapes and dtypes, the number of
parameters and bytes, and (for a Lightning checkpoint) the entries beside the state dict. The file
is read as a transfer reads it (format found from the content; weights_only unpickling): through a
memory map, so memory does not grow with the file's size. Legacy (non-zip) torch files cannot be
mapped and are read whole.

Formats: PyTorch zip or legacy pickle (.ckpt .pt .pth .bin), Lightning checkpoints (their
state_dict), safetensors, Hugging Face sharded checkpoints (a *.index.json and its shards).

examples:
  pl-pretrain inspect model_checkpoints/encoder.ckpt
  pl-pretrain inspect model.safetensors.index.json --filter 'encoder.*' --limit 20
  pl-pretrain inspect encoder.ckpt --json --sha256"""


def _add_inspect(commands: Any) -> None:
    p = _subparser(
        commands, "inspect", "show a checkpoint's format, keys, shapes, dtypes and size", INSPECT_DESCRIPTION
    )
    p.add_argument("file", metavar="FILE", help="a checkpoint file, or a sharded checkpoint's *.index.json")
    p.add_argument(
        "--filter",
        dest="filters",
        action="append",
        default=[],
        metavar="GLOB",
        help="list only keys matching a glob ('*' crosses dots; repeatable); totals stay the file's",
    )
    p.add_argument("--limit", type=_count, metavar="N", help="list at most N keys")
    p.add_argument("--sha256", action="store_true", help="also hash the file (reads it whole: slow for big files)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(command=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    """Prints what the checkpoint holds; returns the exit code."""
    path = _existing_file(args.file, "Checkpoint")
    info = describe_checkpoint(path, filters=args.filters, limit=args.limit, sha256=args.sha256)
    if args.json:
        _print_json(info)
        return EXIT_OK
    summary = [
        ("file", str(args.file)),
        (
            "format",
            info["format"] + (f" (Lightning {info['lightning_version']})" if info.get("lightning_version") else ""),
        ),
        ("size", f"{format_bytes(info['file_bytes'])} on disk"),
        ("tensors", f"{info['tensors']:,}"),
        ("parameters", f"{info['parameters']:,} ({format_bytes(info['tensor_bytes'])})"),
        ("dtypes", ", ".join(f"{dtype} ({n})" for dtype, n in info["dtypes"].items())),
    ]
    if info["shards"]:
        summary.append(("shards", f"{len(info['shards'])}: {', '.join(info['shards'])}"))
    if info["other_entries"]:
        summary.append(("not loaded", ", ".join(f"{k}: {v}" for k, v in info["other_entries"].items())))
    if info.get("sha256"):
        summary.append(("sha256", info["sha256"]))
    width = max(len(name) for name, _ in summary)
    for name, value in summary:
        print(f"{name.ljust(width)}  {value}")
    print()
    _print_table(["key", "shape", "dtype"], [[k["key"], str(k["shape"]), k["dtype"]] for k in info["keys"]])
    if info["shown"] < info["matching"] or args.filters:
        print(f"({info['shown']} of {info['matching']} matching keys shown; the file holds {info['tensors']})")
    return EXIT_OK


def describe_checkpoint(
    path: pathlib.Path, *, filters: Sequence[str] = (), limit: int | None = None, sha256: bool = False
) -> dict[str, Any]:
    """Returns what a checkpoint holds, as plain data: format, counts, sizes, dtypes and its keys.

    The tensors come from `read_state_dict` (memory-mapped, nothing copied); parameters and bytes
    count each stored tensor once, even when several names share it (tied weights).
    """
    # A collected index (<key>.ckpt) has its shards in <key>.shards/; a plain *.index.json beside it.
    state, fmt = read_state_dict(path, shard_dir=path.parent / shard_folder_name(path.name))
    seen: set[tuple[Any, ...]] = set()
    parameters = tensor_bytes = 0
    dtypes: dict[str, int] = {}
    for tensor in state.values():
        dtype = str(tensor.dtype).removeprefix("torch.")
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if identity not in seen:
            seen.add(identity)
            parameters += tensor.numel()
            tensor_bytes += tensor.numel() * tensor.element_size()
    matching = [key for key in state if not filters or any(fnmatch.fnmatchcase(key, p) for p in filters)]
    shown = matching if limit is None else matching[:limit]
    top = _top_level(path, fmt)
    info: dict[str, Any] = {
        "file": str(path),
        "format": fmt,
        "file_bytes": path.stat().st_size,
        "tensors": len(state),
        "parameters": parameters,
        "tensor_bytes": tensor_bytes,
        "dtypes": dtypes,
        "shards": shard_names(path) or [],
        "lightning_version": top.get("pytorch-lightning_version"),
        "other_entries": {key: _brief(value) for key, value in top.items() if key != "state_dict"},
        "matching": len(matching),
        "shown": len(shown),
        "keys": [
            {"key": k, "shape": list(state[k].shape), "dtype": str(state[k].dtype).removeprefix("torch.")}
            for k in shown
        ],
    }
    if sha256:
        info["sha256"] = "sha256:" + file_sha256(path)
    return info


def _top_level(path: pathlib.Path, fmt: str) -> dict[str, Any]:
    """Returns the top-level entries of a zip torch file that holds a ``state_dict`` entry (else {})."""
    if fmt not in ("torch", "lightning") or detect_format(path) != "torch":
        return {}  # safetensors and indexes hold only tensors; a legacy pickle cannot be mapped, and is not read twice
    import torch

    # Mapped, with the same safe unpickler as the transfer: reading it again costs the pickle only.
    top = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(top, dict) or not isinstance(top.get("state_dict"), Mapping):
        return {}
    return dict(top)


def _brief(value: Any) -> str:
    """Returns a short description of a checkpoint entry that is not parameters."""
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k}={_brief(v)}" for k, v in list(value.items())[:4])
        more = ", ..." if len(value) > 4 else ""
        return f"{{{inner}{more}}}" if len(inner) <= 60 else f"dict of {len(value)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"tensor {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
