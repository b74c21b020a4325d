"""Hook registries: which function loads an object of a given type, found along its MRO.

`DEFAULT_TRANSFER_HOOKS` maps a class to ``hook(obj, path)``, `DEFAULT_LOAD_HOOKS` to
``hook(obj, path, end_of_epoch)``, as in SpeechBrain. A class can load itself with
`register_checkpoint_hooks` and `mark_as_transfer` / `mark_as_loader`. These two dicts are the
one place a hook is looked up; the defaults for torch's types are registered at the bottom.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

import torch

from pl_pretrain.errors import ArgumentTypeError
from pl_pretrain.transfer.apply import torch_parameter_transfer
from pl_pretrain.transfer.options import PathLike

__all__ = [
    "DEFAULT_TRANSFER_HOOKS",
    "DEFAULT_LOAD_HOOKS",
    "get_default_hook",
    "mark_as_transfer",
    "mark_as_loader",
    "mark_as_saver",
    "register_checkpoint_hooks",
]

DEFAULT_TRANSFER_HOOKS: dict[type, Callable[..., Any]] = {}
DEFAULT_LOAD_HOOKS: dict[type, Callable[..., Any]] = {}
DEFAULT_SAVE_HOOKS: dict[type, Callable[..., Any]] = {}  # recorded by mark_as_saver, never called here


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
        # A TypeError, as SpeechBrain raises: its users' code catches that.
        raise ArgumentTypeError(
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


def mark_as_saver(method: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a method ``saver(self, path)`` as its class's save hook, as SpeechBrain's decorator does.

    pl_pretrain only loads: the saver is recorded in `DEFAULT_SAVE_HOOKS` and never called here.
    It exists so that a class written for SpeechBrain's ``Checkpointer`` keeps its decorators.
    """
    _check_signature(method, ("self", "path"), "mark_as_saver")
    method._pl_pretrain_saver = True  # type: ignore[attr-defined]
    return method


_T = TypeVar("_T", bound=type)


@overload
def register_checkpoint_hooks(cls: _T, save_on_main_only: bool = True) -> _T: ...


@overload
def register_checkpoint_hooks(cls: None = None, save_on_main_only: bool = True) -> Callable[[_T], _T]: ...


def register_checkpoint_hooks(cls: _T | None = None, save_on_main_only: bool = True) -> _T | Callable[[_T], _T]:
    """Class decorator: registers the class's `mark_as_transfer` / `mark_as_loader` / `mark_as_saver` methods.

    As SpeechBrain's: ``@register_checkpoint_hooks``, or ``register_checkpoint_hooks(cls,
    save_on_main_only=False)``; ``@register_checkpoint_hooks(save_on_main_only=False)`` works too.
    A class with no marked method is returned unchanged. `save_on_main_only` is recorded with the
    saver (SpeechBrain's ``Checkpointer`` runs such savers on one rank); pl_pretrain never saves.
    """
    if cls is None:
        return lambda target: register_checkpoint_hooks(target, save_on_main_only)
    for _name, method in vars(cls).items():
        if getattr(method, "_pl_pretrain_transfer", False):
            DEFAULT_TRANSFER_HOOKS[cls] = method
        if getattr(method, "_pl_pretrain_loader", False):
            DEFAULT_LOAD_HOOKS[cls] = method
        if getattr(method, "_pl_pretrain_saver", False):
            method._pl_pretrain_save_on_main_only = save_on_main_only
            DEFAULT_SAVE_HOOKS[cls] = method
    return cls


# The defaults, registered on ``import pl_pretrain.transfer``: modules get the memory-mapped
# transfer; optimizers and schedulers load their own state dict.
DEFAULT_TRANSFER_HOOKS[torch.nn.Module] = torch_parameter_transfer


def _torch_state_loader(obj: Any, path: PathLike, end_of_epoch: bool) -> None:
    """Loads an optimizer's or a scheduler's state dict (unpickled with weights_only=True)."""
    obj.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))


for _cls in (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.amp.GradScaler):
    DEFAULT_LOAD_HOOKS[_cls] = _torch_state_loader


def _sentencepiece_transfer(obj: Any, path: PathLike) -> None:
    """Loads a SentencePiece model file into a ``SentencePieceProcessor`` (which takes only a str path)."""
    obj.load(str(path))


try:  # as SpeechBrain does: a hook for SentencePiece when it is installed
    from sentencepiece import SentencePieceProcessor
except ImportError:
    pass
else:
    DEFAULT_TRANSFER_HOOKS[SentencePieceProcessor] = _sentencepiece_transfer
