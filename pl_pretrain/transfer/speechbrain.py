"""SpeechBrain's knowledge in one module: its hooks for the classes it knows, and its legacy key names.

pl_pretrain never imports SpeechBrain. Its hook registries are read only when
``speechbrain.utils.checkpoints`` is already imported, which it is whenever an object of one of
SpeechBrain's classes, or of a class decorated with SpeechBrain's ``register_checkpoint_hooks``,
exists. SpeechBrain's generic hooks for plain modules, optimizers and schedulers are left out:
pl_pretrain's own take their place (memory-mapped, ``weights_only=True``, one report).
(SpeechBrain's fetching types are converted by value where ours are checked, in
`pl_pretrain.fetching.sources`.)
"""

from __future__ import annotations

import functools
import pathlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["LEGACY_KEY_RENAMES", "speechbrain_hook"]

LEGACY_KEY_RENAMES: dict[str, str] = {
    ".mutihead_attn": ".multihead_attn",
    ".convs_intermedite": ".convs_intermediate",
}
"""Substrings of old SpeechBrain checkpoint keys and their current spelling.

SpeechBrain renames them on every load (``speechbrain.utils.checkpoints.KEYS_MAPPING``, applied by
its ``torch_parameter_transfer``): Transformer checkpoints saved before the typo fixes still load.
"""

_CHECKPOINTS = "speechbrain.utils.checkpoints"
_GENERIC = ("torch_parameter_transfer", "torch_recovery")  # SpeechBrain's hooks for torch's own types


def speechbrain_hook(obj: Any) -> Callable[[Any, pathlib.Path], Any] | None:
    """Returns ``hook(obj, path)`` from SpeechBrain's registries for `obj`'s class, or None.

    As SpeechBrain's ``Pretrainer`` does: its transfer hooks first, then its load hooks (called
    with ``end_of_epoch=False``), each found along the MRO. None when SpeechBrain is not imported,
    knows nothing of the class, or has only a generic torch hook for it.
    """
    checkpoints = sys.modules.get(_CHECKPOINTS)
    if checkpoints is None:
        return None
    from pl_pretrain.transfer.hooks import get_default_hook  # here: hooks imports the engine, which imports this

    generic = [getattr(checkpoints, name, None) for name in _GENERIC]
    transfer = get_default_hook(obj, getattr(checkpoints, "DEFAULT_TRANSFER_HOOKS", {}))
    if transfer is not None:
        return None if transfer in generic else transfer
    loader = get_default_hook(obj, getattr(checkpoints, "DEFAULT_LOAD_HOOKS", {}))
    if loader is None or loader in generic:
        return None

    @functools.wraps(loader)  # reports name SpeechBrain's method, not this wrapper
    def load(target: Any, path: pathlib.Path) -> Any:
        return loader(target, path, False)

    return load
