"""Environment variables and defaults: every knob pl_pretrain reads, read in this one place.

Environment variables are read when asked for (not at import), so that a test or a launcher that
sets them after ``import pl_pretrain`` is still heard.
"""

from __future__ import annotations

import datetime
import math
import os
import pathlib

from pl_pretrain.errors import ConfigurationError

__all__ = [
    "DEFAULT_COLLECT_IN",
    "RECORD_DIR",
    "PARAMFILE_EXT",
    "DEFAULT_COLLECT_TIMEOUT",
    "ENV_CACHE",
    "ENV_COLLECT_TIMEOUT",
    "ENV_LAUNCHER_WORLD_SIZE",
    "cache_root",
    "collect_timeout",
    "launcher_world_size",
    "DEFAULT_STREAM_TIMEOUT",
    "DEFAULT_STREAM_CHUNK",
    "ENV_STREAM_TIMEOUT",
    "ENV_STREAM_CHUNK",
    "ENV_TEST_STREAM_FAULT",
    "stream_timeout",
    "stream_chunk_size",
    "stream_fault",
]

DEFAULT_COLLECT_IN = "./model_checkpoints"
"""The seed's default collection folder (SpeechBrain 1.1 uses ``None``; see docs/migration.md)."""

RECORD_DIR = ".pl_pretrain"
"""Name of the folder, inside a collection folder, that holds records, locks and temporary files."""

PARAMFILE_EXT = ".ckpt"
"""Every loadable is collected as ``<key>.ckpt``, whatever its source file is called."""

DEFAULT_COLLECT_TIMEOUT = datetime.timedelta(hours=24)
"""How long ranks wait for the fetching rank: far beyond a slow download, never forever."""

ENV_CACHE = "PL_PRETRAIN_CACHE"
"""Folder for URL (and object-store) downloads made with no collection folder; default ``~/.cache/pl_pretrain``."""

ENV_COLLECT_TIMEOUT = "PL_PRETRAIN_COLLECT_TIMEOUT"
"""Seconds the ranks wait for the fetching rank, overriding `DEFAULT_COLLECT_TIMEOUT`."""

DEFAULT_STREAM_TIMEOUT = datetime.timedelta(seconds=60)
"""How long one step of a stream between nodes (one chunk sent or received) may take before the
peer counts as stopped: short, because a chunk moves in well under a second on any interconnect."""

DEFAULT_STREAM_CHUNK = 4 * 1024 * 1024
"""Bytes per chunk of a stream between nodes; each node holds two chunks at a time, whatever the file's size."""

ENV_STREAM_TIMEOUT = "PL_PRETRAIN_STREAM_TIMEOUT"
"""Seconds one step of a stream between nodes may take, overriding `DEFAULT_STREAM_TIMEOUT`."""

ENV_STREAM_CHUNK = "PL_PRETRAIN_STREAM_CHUNK"
"""Bytes per chunk of a stream between nodes, overriding `DEFAULT_STREAM_CHUNK` (64 KiB to 256 MiB)."""

ENV_TEST_STREAM_FAULT = "PL_PRETRAIN_TEST_STREAM_FAULT"
"""Test hook, never for production: ``flip:N`` (the sender flips a byte of chunk N after hashing it,
a corruption in transit), ``exit:N`` (this rank dies at chunk N) or ``stop:N`` (it stops, SIGSTOP)."""


ENV_LAUNCHER_WORLD_SIZE = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
"""Where launchers say how many processes they started (torchrun, Open MPI, MPICH/Intel MPI, SLURM ``srun``)."""


def launcher_world_size() -> tuple[str, int] | None:
    """Returns (variable, value) of the first launcher variable that says more than one process was started.

    Values are read as integers after stripping spaces (``" 2"`` is 2). ``SLURM_NTASKS`` counts only
    inside a task that ``srun`` started (``SLURM_STEP_ID`` is set there, not in a batch script's
    own shell, which is one process whatever the allocation's size).
    """
    for name in ENV_LAUNCHER_WORLD_SIZE:
        text = os.environ.get(name, "").strip()
        if name == "SLURM_NTASKS":
            text = os.environ.get("SLURM_STEP_NUM_TASKS", "").strip() or (
                text if os.environ.get("SLURM_STEP_ID", "").strip() not in ("", "batch", "extern") else ""
            )
        try:
            value = int(text)
        except ValueError:
            continue
        if value > 1:
            return name, value
    return None


def cache_root() -> pathlib.Path:
    """Returns the cache folder for downloads that have no collection folder (``$PL_PRETRAIN_CACHE``)."""
    return pathlib.Path(os.environ.get(ENV_CACHE) or pathlib.Path.home() / ".cache" / "pl_pretrain").expanduser()


def collect_timeout(timeout: datetime.timedelta | float | None = None) -> datetime.timedelta:
    """Returns how long to wait for the fetching rank: `timeout`, else the environment, else 24 h.

    Raises:
        ConfigurationError: the value is not a finite, positive number of seconds.
    """
    if timeout is not None:
        return _positive_seconds(timeout, "timeout", example="3600 (one hour)", default="24 hours")
    text = os.environ.get(ENV_COLLECT_TIMEOUT, "").strip()
    if not text:
        return DEFAULT_COLLECT_TIMEOUT
    return _positive_seconds(text, ENV_COLLECT_TIMEOUT, example="3600 (one hour)", default="24 hours")


def stream_timeout() -> datetime.timedelta:
    """Returns how long one step of a stream between nodes may take (``$PL_PRETRAIN_STREAM_TIMEOUT``, else 60 s).

    Raises:
        ConfigurationError: the value is not a finite, positive number of seconds.
    """
    text = os.environ.get(ENV_STREAM_TIMEOUT, "").strip()
    if not text:
        return DEFAULT_STREAM_TIMEOUT
    return _positive_seconds(text, ENV_STREAM_TIMEOUT, example="60", default="60 s")


def _positive_seconds(value: object, where: str, *, example: str, default: str) -> datetime.timedelta:
    """Returns `value` (a timedelta, or a number of seconds, also as text) as a timedelta.

    Raises:
        ConfigurationError: it is not a finite, positive number of seconds; the message names `where`.
    """
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
    else:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(
            f"{where}={value!r} is not a finite, positive number of seconds.",
            hint=f"Give e.g. {where}={example}, or leave it unset for the default of {default}.",
        )
    return datetime.timedelta(seconds=seconds)


def stream_chunk_size() -> int:
    """Returns the bytes per chunk of a stream between nodes (``$PL_PRETRAIN_STREAM_CHUNK``, else 4 MiB).

    Raises:
        ConfigurationError: the value is not a whole number between 64 KiB and 256 MiB.
    """
    text = os.environ.get(ENV_STREAM_CHUNK, "").strip()
    if not text:
        return DEFAULT_STREAM_CHUNK
    if not text.isdigit() or not 64 * 1024 <= int(text) <= 256 * 1024 * 1024:
        raise ConfigurationError(
            f"{ENV_STREAM_CHUNK}={text!r} is not a number of bytes between 65536 (64 KiB) and 268435456 (256 MiB).",
            hint=f"Give e.g. {ENV_STREAM_CHUNK}=4194304 (4 MiB), or leave it unset.",
        )
    return int(text)


def stream_fault() -> tuple[str, int] | None:
    """Returns the test hook ``$PL_PRETRAIN_TEST_STREAM_FAULT`` as (what, chunk index), or None when unset."""
    text = os.environ.get(ENV_TEST_STREAM_FAULT, "").strip()
    what, _, index = text.partition(":")
    if what not in ("flip", "exit", "stop") or not index.isdigit():
        return None
    return what, int(index)
