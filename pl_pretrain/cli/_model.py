"""Building the model a plan loads into: import it by name, build it on the meta device, pick the submodule."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import pathlib
import pkgutil
import sys
from collections.abc import Mapping
from typing import Any

from pl_pretrain.cli._common import UsageError


def _instantiate(cls: Any, init: dict[str, Any], class_path: str) -> Any:
    """Returns ``cls`` built from `init` the way LightningCLI builds its model (jsonargparse)."""
    try:
        from jsonargparse import ArgumentParser
    except ImportError:
        raise UsageError("plan --config needs jsonargparse (pip install 'jsonargparse[signatures]').") from None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "model", fail_untyped=False)
    try:
        parsed = parser.parse_object({"model": init})
    except argparse.ArgumentError as error:
        raise UsageError(f"the config's model arguments do not fit {class_path}: {error}") from None
    build = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse >= 4.49: instantiate
    return build(parsed).model


def _import_object(spec: str) -> Any:
    """Returns the object an import path names: ``pkg.module:Name``, ``pkg.module.Name`` or ``file.py:Name``."""
    module_name, sep, name = spec.partition(":")
    if not sep:
        module_name, _, name = spec.rpartition(".")
    if not module_name or not name:
        raise UsageError(f"'{spec}' is not an import path: give pkg.module:Name or path/to/file.py:Name.")
    obj = _from_file(spec, module_name, name) if module_name.endswith(".py") else _from_module(spec, module_name, name)
    if not callable(obj):
        raise UsageError(f"'{spec}' is a {type(obj).__name__}, not a class or a function that builds the model.")
    return obj


def _from_module(spec: str, module_name: str, name: str) -> Any:
    """Returns what ``pkg.module:Name`` (or ``pkg.module.Name``) names, by `pkgutil.resolve_name`."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does; the console script does not
    try:
        return pkgutil.resolve_name(spec)
    except ValueError:
        raise UsageError(f"'{spec}' is not an import path: give pkg.module:Name or path/to/file.py:Name.") from None
    except Exception as error:
        # An AttributeError is a missing name only when the module itself imported; raised while
        # importing it, it is the user's module failing, like any other error there.
        if isinstance(error, AttributeError) and module_name in sys.modules:
            raise UsageError(f"'{module_name}' has no '{name}' (from '{spec}').") from None
        raise UsageError(f"Could not import '{module_name}' (from '{spec}'): {type(error).__name__}: {error}") from None


def _from_file(spec: str, file_name: str, name: str) -> Any:
    """Returns what ``path/to/file.py:Name`` names, the file run as a module named after it.

    Ours, not `pkgutil.resolve_name`: that imports modules by name only, and a file's stem need
    not be one (``my-model.py``).
    """
    file = pathlib.Path(file_name).expanduser().resolve()
    if not file.is_file():
        raise UsageError(f"'{spec}': the file '{file_name}' does not exist.")
    sys.path.insert(0, str(file.parent))  # its own imports of its neighbours, as `python file.py` allows
    module = sys.modules.get(file.stem)
    if module is None or os.path.realpath(getattr(module, "__file__", "") or "") != str(file):
        try:
            loader_spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
            sys.modules[file.stem] = module
            loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as error:  # the user's module failing to import: say so in one line
            raise UsageError(
                f"Could not import '{file_name}' (from '{spec}'): {type(error).__name__}: {error}"
            ) from None
    try:
        return functools.reduce(getattr, name.split("."), module)
    except AttributeError:
        raise UsageError(f"'{file_name}' has no '{name}' (from '{spec}').") from None


def _build(make: Any, what: str) -> tuple[Any, bool, str]:
    """Returns (model, built on meta, a note): on the meta device when possible, else normally."""
    import torch

    try:
        with torch.device("meta"):
            model = make()
            _configure(model)
        return model, True, ""
    except UsageError:
        raise
    except Exception as meta_error:
        why = f"{type(meta_error).__name__}: {meta_error}".splitlines()[0]
    try:
        model = make()
        _configure(model)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"Could not build the model {what}: {type(error).__name__}: {error}") from None
    return model, False, f" (the meta device failed: {why})"


def _configure(model: Any) -> None:
    # Layers a LightningModule builds in configure_model exist only after it, as in a real job.
    configure = getattr(model, "configure_model", None)
    if callable(configure):
        configure()


def _submodule(model: Any, attribute: str) -> Any:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"The model is a {type(model).__name__}, not a torch.nn.Module.")
    try:
        module = model.get_submodule("" if attribute in ("", "self") else attribute)
    except AttributeError as error:
        children = ", ".join(name for name, _ in model.named_children()) or "no submodules"
        raise UsageError(
            f"No submodule '{attribute}' in {type(model).__name__} ({error}); it has: {children}."
        ) from None
    return module


def _call_text(spec: str, init: Mapping[str, Any]) -> str:
    arguments = ", ".join(f"{k}={v!r}" for k, v in init.items())
    return f"{spec}({arguments})"
