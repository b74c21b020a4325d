"""Materialisation: modules left on the meta device get real memory and their own ``reset_parameters()``, once.

Why before the load: when any tensor is still on ``meta`` as a Lightning strategy sets up
(``ModelParallelStrategy``, ``FSDPStrategy``), Lightning calls ``to_empty()`` on the whole model
and ``reset_parameters()`` on every submodule, which would overwrite weights loaded before it.
Materialising first, as Lightning would (module by module, so DTensor shards stay sharded),
leaves nothing for Lightning's pass to do: the load then fills what the files hold, and modules
they do not hold (a new head) keep this one initialisation.
"""

from __future__ import annotations

import torch

__all__ = ["materialize_meta"]


def materialize_meta(model: torch.nn.Module, device: torch.device) -> set[str]:
    """Returns the class names of modules that had tensors on ``meta`` and no ``reset_parameters()``.

    Every module of `model` with a parameter or buffer of its own on the meta device is moved to
    `device` with ``to_empty`` (its memory is then uninitialised) and reset with its own
    ``reset_parameters()`` where it has one.
    """
    uninitialised = set()
    for module in model.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if not any(tensor.is_meta for tensor in own):
            continue
        module.to_empty(device=device, recurse=False)
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
        else:
            uninitialised.add(type(module).__name__)
    return uninitialised
