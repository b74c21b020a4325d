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
    where = "timeout"
    value: object = timeout
    if timeout is None:
        value = os.environ.get(ENV_COLLECT_TIMEOUT, "").strip()
        if not value:
            return DEFAULT_COLLECT_TIMEOUT
        where = ENV_COLLECT_TIMEOUT
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
            hint=f"Give e.g. {where}=3600 (one hour), or leave it unset for the default of 24 hours.",
        )
    return datetime.timedelta(seconds=seconds)
