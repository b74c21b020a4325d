"""pl_pretrain: pretrained parameters for PyTorch models in distributed jobs.

One process fetches, every process loads, and nothing hangs, races or half-writes on the way.
`__all__` below is the whole public API (docs/architecture.md says where each concept lives);
every other name in the package is internal and may change.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pl_pretrain.errors import (
    ArgumentTypeError,
    ChecksumError,
    ConfigurationError,
    FetchError,
    OfflineError,
    PretrainerError,
    RemoteError,
    TransferError,
    UnsafeCheckpointError,
)
from pl_pretrain.fetching import FetchConfig, FetchFrom, FetchSource, LocalStrategy, fetch, guess_source
from pl_pretrain.pretrainer import Pretrainer
from pl_pretrain.transfer import (
    DEFAULT_LOAD_HOOKS,
    DEFAULT_TRANSFER_HOOKS,
    TransferOptions,
    TransferReport,
    mark_as_loader,
    mark_as_saver,
    mark_as_transfer,
    plan_transfer,
    register_checkpoint_hooks,
    torch_parameter_transfer,
)

try:
    __version__ = version("pl-pretrain")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# Lightning takes seconds to import; plain torchrun users and the CLI should not pay for it.
_LIGHTNING_NAMES = {"PretrainerCallback", "load_pretrained"}


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_NAMES:
        from pl_pretrain import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'pl_pretrain' has no attribute {name!r}")


__all__ = [
    # fetching
    "FetchConfig",
    "FetchFrom",
    "FetchSource",
    "LocalStrategy",
    "fetch",
    "guess_source",
    # transfer
    "DEFAULT_LOAD_HOOKS",
    "DEFAULT_TRANSFER_HOOKS",
    "TransferOptions",
    "TransferReport",
    "mark_as_loader",
    "mark_as_saver",
    "mark_as_transfer",
    "plan_transfer",
    "register_checkpoint_hooks",
    "torch_parameter_transfer",
    # collecting and loading
    "Pretrainer",
    "PretrainerCallback",
    "load_pretrained",
    # errors a user may catch
    "PretrainerError",
    "ConfigurationError",
    "ArgumentTypeError",
    "FetchError",
    "OfflineError",
    "ChecksumError",
    "TransferError",
    "UnsafeCheckpointError",
    "RemoteError",
    "__version__",
]
