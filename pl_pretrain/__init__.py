"""pl_pretrain: pretrained parameters for PyTorch models in distributed jobs.

One process fetches, every process loads, and nothing hangs, races or half-writes on the way.
The public API is re-exported here; see DESIGN.md for the contract.
"""

from pl_pretrain.errors import PretrainerError
from pl_pretrain.fetching import FetchConfig, FetchFrom, FetchSource, LocalStrategy, fetch, guess_source
from pl_pretrain.pretrainer import Pretrainer
from pl_pretrain.transfer import (
    DEFAULT_LOAD_HOOKS,
    DEFAULT_TRANSFER_HOOKS,
    TransferOptions,
    TransferReport,
    mark_as_loader,
    mark_as_transfer,
    register_checkpoint_hooks,
    torch_parameter_transfer,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lightning takes seconds to import; plain torchrun users and the CLI should not pay for it.
    if name == "PretrainerCallback":
        from pl_pretrain.callback import PretrainerCallback

        return PretrainerCallback
    raise AttributeError(f"module 'pl_pretrain' has no attribute {name!r}")


__all__ = [
    "FetchConfig",
    "FetchFrom",
    "FetchSource",
    "LocalStrategy",
    "fetch",
    "guess_source",
    "DEFAULT_LOAD_HOOKS",
    "DEFAULT_TRANSFER_HOOKS",
    "TransferOptions",
    "TransferReport",
    "mark_as_loader",
    "mark_as_transfer",
    "register_checkpoint_hooks",
    "torch_parameter_transfer",
    "Pretrainer",
    "PretrainerCallback",
    "PretrainerError",
]
