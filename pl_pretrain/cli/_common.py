"""The commands' shared parts: exit codes, the one-line-error parser, argument types and printing.

Every command module builds on these; `pl_pretrain.cli` maps errors to the exit codes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
"""The work failed: a fetch, a checkpoint that cannot be read, a load that would fail."""
EXIT_USAGE = 2
"""The command line or a config file is wrong (argparse's own code for usage errors)."""

PROG = "pl-pretrain"

EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}  done (plan: a real load would succeed)
  {EXIT_FAILED}  the work failed: a fetch, a file that is not a readable checkpoint, a checksum
     (plan: a real load would fail)
  {EXIT_USAGE}  the command line or a config file is wrong
  Errors are one line on stderr: "{PROG}: error: <message>"."""


class UsageError(Exception):
    """The command line or a config file is wrong (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse prints the usage, then exits)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _subparser(commands: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _pair(what: str, *, empty_key: bool = False, empty_value: bool = False) -> Callable[[str], tuple[str, str]]:
    """Returns an argparse type that splits ``NAME=VALUE`` at the first ``=``."""

    def parse(text: str) -> tuple[str, str]:
        name, sep, value = text.partition("=")
        if not sep or (not name and not empty_key) or (not value and not empty_value):
            raise argparse.ArgumentTypeError(f"{text!r} is not of the form {what}")
        return name, value

    return parse


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=1, default=str))


def _shown_path(path: os.PathLike | str) -> str:
    """Returns `path` relative to the current folder when it lies inside it, else as it is."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _existing_file(text: str, what: str) -> pathlib.Path:
    path = pathlib.Path(text).expanduser()
    if not path.exists():
        raise UsageError(f"{what} '{text}' does not exist.")
    if path.is_dir():
        raise UsageError(f"{what} '{text}' is a folder, not a file.")
    if not path.is_file():
        raise UsageError(f"{what} '{text}' is not a regular file (a device, a pipe or a socket).")
    return path


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    """Prints left-aligned columns, the last one unpadded."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join([*(str(row[i]).ljust(widths[i]) for i in range(len(widths))), str(row[-1])]).rstrip())


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value
