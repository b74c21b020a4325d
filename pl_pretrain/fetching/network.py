"""What every network source shares: the offline switch, retries with backoff, and progress bars."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pl_pretrain.errors import FetchError
from pl_pretrain.fetching.sources import FetchConfig

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class _Transient(Exception):
    """A network failure worth retrying."""


def _offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set: huggingface_hub's switch is ours too."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _network_allowed(config: FetchConfig) -> bool:
    return config.allow_network and not _offline()


def _offline_state(config: FetchConfig) -> str:
    """Returns why the network is off, for messages."""
    return f"offline: allow_network={config.allow_network}, HF_HUB_OFFLINE={'1' if _offline() else '0'}"


def _retrying(what: str, config: FetchConfig, call: Callable[[], _T], *, source: str) -> _T:
    """Runs `call` until it succeeds, retrying `_Transient` failures `config.retries` times with backoff."""
    attempts = max(0, int(config.retries))
    delay = max(0.0, float(config.backoff))
    for attempt in range(attempts + 1):
        try:
            return call()
        except _Transient as error:
            if attempt == attempts:
                raise FetchError(
                    f"{what} failed {attempts + 1} time{'s' if attempts else ''}; last cause: {error}.",
                    source=source,
                    hint="The server or the network is failing; try again later, or raise FetchConfig(retries=...).",
                ) from error
            logger.warning("%s failed (%s); retrying in %.1f s (%d/%d).", what, error, delay, attempt + 1, attempts)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


def _progress_bar(total: int | None, name: str, enabled: bool | None) -> Any:
    """Returns a byte progress bar; huggingface_hub's tqdm hides it when ``HF_HUB_DISABLE_PROGRESS_BARS`` is set."""
    from huggingface_hub.utils import tqdm

    if enabled is None:
        enabled = os.isatty(2)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not enabled, leave=False)
