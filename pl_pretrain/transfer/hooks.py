"""Hook registries: which function loads an object of a given type, found along its MRO.

`DEFAULT_TRANSFER_HOOKS` maps a class to ``hook(obj, path)``, `DEFAULT_LOAD_HOOKS` to
``hook(obj, path, end_of_epoch)``, as in SpeechBrain. A class can load itself with
`register_checkpoint_hooks` and `mark_as_transfer` / `mark_as_loader`. These two dicts are the
one place a hook is looked up; the defaults for torch's types are registered at the bottom.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from pl_pretrain.errors import ConfigurationError
from pl_pretrain.transfer.apply import torch_parameter_transfer
from pl_pretrain.transfer.options import PathLike

__all__ = [
    "DEFAULT_TRANSFER_HOOKS",
    "DEFAULT_LOAD_HOOKS",
    "get_default_hook",
    "mark_as_transfer",
    "mark_as_loader",
    "register_checkpoint_hooks",
]

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


# The defaults, registered on ``import pl_pretrain.transfer``: modules get the memory-mapped
# transfer; optimizers and schedulers load their own state dict.
DEFAULT_TRANSFER_HOOKS[torch.nn.Module] = torch_parameter_transfer


def _torch_state_loader(obj: Any, path: PathLike, end_of_epoch: bool) -> None:
    """Loads an optimizer's or a scheduler's state dict (unpickled with weights_only=True)."""
    obj.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))


for _cls in (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler):
    DEFAULT_LOAD_HOOKS[_cls] = _torch_state_loader
