"""Transfer: a local file -> an object; this package re-exports its public names.

Hooks are found by type along the MRO, as in SpeechBrain (`hooks`). The default hook for
``torch.nn.Module``, `torch_parameter_transfer` (`apply`), reads the file through a memory map
(`readers`) and copies each tensor once into the module's parameters, so a transfer adds almost no
private memory and ranks on one node share the page cache. Which file key fills which target key
is decided by `keys` from the `TransferOptions` (`options`); the `TransferReport` (`report`) says
exactly which keys were loaded, missing, unexpected or mismatched.

What it reads, found from the file's content (every collected file is called ``<key>.ckpt``):

- PyTorch files (``torch.save``: .ckpt .pt .pth .bin), zip or legacy; a dict holding a
  ``state_dict`` entry (a Lightning checkpoint) gives that entry; nested dicts of tensors are
  flattened to dotted names;
- ``.safetensors`` files;
- Hugging Face sharded checkpoints: a ``*.index.json`` whose ``weight_map`` names its shards
  (safetensors or torch files), looked up in the shard folder the caller passes (``shard_dir``;
  the Pretrainer passes ``<collect_in>/<key>.shards``), then beside the index, then beside the
  index's real location (through links).

Checkpoints are unpickled with ``weights_only=True``: a file that needs arbitrary code fails with
`UnsafeCheckpointError` naming the globals it wanted; `TransferOptions(weights_only=False)` opts in,
per loadable. There is never a silent fallback to unsafe loading.

This package knows nothing about ranks.
"""

from __future__ import annotations

from typing import Any

from pl_pretrain.transfer.apply import diagnose_transfer, plan_transfer, torch_parameter_transfer
from pl_pretrain.transfer.hooks import (
    DEFAULT_LOAD_HOOKS,
    DEFAULT_TRANSFER_HOOKS,
    get_default_hook,
    mark_as_loader,
    mark_as_saver,
    mark_as_transfer,
    register_checkpoint_hooks,
)
from pl_pretrain.transfer.options import TransferOptions
from pl_pretrain.transfer.readers import detect_format, read_state_dict, shard_names, shard_path
from pl_pretrain.transfer.report import TransferReport, format_bytes, format_reports, incomplete_keys

__all__ = [
    "DEFAULT_TRANSFER_HOOKS",
    "DEFAULT_LOAD_HOOKS",
    "TransferReport",
    "TransferOptions",
    "mark_as_transfer",
    "mark_as_loader",
    "mark_as_saver",
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
    "shard_path",
    "shard_folder_name",
]


def __getattr__(name: str) -> Any:
    # The Pretrainer's <key>.shards naming moved to pl_pretrain.pretrainer (the readers are given
    # the folder, they do not guess it); old imports keep working. Lazy: pretrainer imports us.
    if name == "shard_folder_name":
        from pl_pretrain.pretrainer import shard_folder_name

        return shard_folder_name
    raise AttributeError(f"module 'pl_pretrain.transfer' has no attribute {name!r}")
