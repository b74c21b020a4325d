"""Conditions: whether a loadable is collected and loaded, said by a bool, a string of one, or a function."""

from __future__ import annotations

from typing import Any

from pl_pretrain.errors import ConfigurationError

__all__ = ["condition_value"]

_STRING_CONDITIONS = {
    "true": True,
    "1": True,
    "yes": True,
    "on": True,
    "false": False,
    "0": False,
    "no": False,
    "off": False,
    "": False,
}


def condition_value(key: str, condition: Any) -> bool:
    """Returns what a loadable's condition says (a bool, a string of one, or a callable returning one).

    Raises:
        ConfigurationError: the condition raised, or is a string that says neither; names the key.
    """
    if callable(condition):
        try:
            condition = condition()
        except Exception as error:
            raise ConfigurationError(
                f"conditions['{key}'] raised {type(error).__name__}: {error}",
                key=key,
                hint="A condition is a bool or a function of no arguments that returns one.",
            ) from error
    if isinstance(condition, str):
        meaning = _STRING_CONDITIONS.get(condition.strip().lower())
        if meaning is None:
            raise ConfigurationError(
                f"conditions['{key}'] is the string {condition!r}, which is neither true nor false.",
                key=key,
                hint="Use true or false (or a function that returns a bool).",
            )
        return meaning
    return bool(condition)
