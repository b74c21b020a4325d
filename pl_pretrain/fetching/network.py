"""What every network source shares: the offline switch, retries with backoff (and the server's Retry-After), time bounds, and progress bars."""

from __future__ import annotations

import email.utils
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pl_pretrain.errors import FetchError
from pl_pretrain.fetching.sources import FetchConfig

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class _Transient(Exception):
    """A network failure worth retrying; `wait` is how long the server asked to be left alone (Retry-After)."""

    def __init__(self, message: str, *, wait: float | None = None) -> None:
        super().__init__(message)
        self.wait = wait


class _Deadline:
    """The time one file has left: ``FetchConfig(max_time=)``, counted from its first request."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._end = math.inf if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return self._end - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0

    def timeout(self, silence: float) -> float:
        """Returns how long one network wait may last: `silence`, or less when the deadline is nearer."""
        return max(0.001, min(silence, self.left()))

    def error(self, what: str, why: str, *, source: str) -> FetchError:
        """Returns the error that says the time ran out, why, and whether a partial file waits for the next run."""
        return FetchError(
            f"{what} ran out of time ({why}): FetchConfig(max_time={self.seconds:g}) bounds one file, "
            "retries and waits included"
            + ("; the partial file is kept, and the next run resumes it." if self.keeps() else "."),
            source=source,
            hint="The server or the link is too slow for this bound; raise FetchConfig(max_time=...), or None for no bound.",
        )

    def keeps(self) -> bool:
        """Whether a partial file is kept for the next run; a download that keeps one replaces this."""
        return False


def _retry_after(headers: Any) -> float | None:
    """Returns the seconds a ``Retry-After`` header (seconds or an HTTP date) asks to wait, or None."""
    value = (headers or {}).get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set: huggingface_hub's switch is ours too."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _network_allowed(config: FetchConfig) -> bool:
    return config.allow_network and not _offline()


def _offline_state(config: FetchConfig) -> str:
    """Returns why the network is off, for messages."""
    return f"offline: allow_network={config.allow_network}, HF_HUB_OFFLINE={'1' if _offline() else '0'}"


def _retrying(
    what: str, config: FetchConfig, call: Callable[[], _T], *, source: str, deadline: _Deadline | None = None
) -> _T:
    """Runs `call` until it succeeds, retrying `_Transient` failures `config.retries` times with backoff.

    A server's ``Retry-After`` (429, 503) is honoured up to ``FetchConfig(max_retry_wait=)``; no wait
    outlasts `deadline`: a retry that could not start in time ends the fetch at once.
    """
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
            wait, why = delay, ""
            if error.wait is not None:
                asked = error.wait
                wait = max(delay, min(asked, config.max_retry_wait))
                why = f", as the server's Retry-After asks ({asked:g} s" + (
                    f", capped by FetchConfig(max_retry_wait={config.max_retry_wait:g}))" if asked > wait else ")"
                )
            if deadline is not None and wait >= deadline.left():
                why = f"after {error}, the next try would start in {wait:g} s, with {max(0.0, deadline.left()):.1f} s left"
                raise deadline.error(what, why, source=source) from error
            logger.warning(
                "%s failed (%s); retrying in %.1f s%s (%d/%d).", what, error, wait, why, attempt + 1, attempts
            )
            time.sleep(wait)
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


def _progress_bar(total: int | None, name: str, enabled: bool | None) -> Any:
    """Returns a byte progress bar; huggingface_hub's tqdm hides it when ``HF_HUB_DISABLE_PROGRESS_BARS`` is set."""
    from huggingface_hub.utils import tqdm

    if enabled is None:
        enabled = os.isatty(2)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not enabled, leave=False)


class ProgressGroup:
    """One progress bar for several files fetched at once (a sharded checkpoint's shards), fed from any thread.

    Each file reports its own (done, total) under its name, so a retried or restarted file is
    never counted twice; `cancelled` tells downloads still running that the group has failed.
    """

    def __init__(self, desc: str, enabled: bool | None) -> None:
        self._bar = _progress_bar(None, desc, enabled)
        self._files: dict[str, tuple[int, int | None]] = {}
        self._lock = threading.Lock()
        self.cancelled = threading.Event()

    def report(self, name: str, done: int, total: int | None) -> None:
        with self._lock:
            self._files[name] = (done, total)
            totals = [t for _, t in self._files.values()]
            self._bar.total = None if None in totals else sum(t for t in totals if t is not None)
            self._bar.n = sum(d for d, _ in self._files.values())
            self._bar.refresh()

    def tqdm_class(self, name: str) -> type:
        """Returns a stand-in for tqdm that huggingface_hub's ``hf_hub_download(tqdm_class=)`` feeds into this bar."""
        group = self

        class _Into:
            def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any) -> None:
                self.done, self.total = initial, total
                group.report(name, self.done, self.total)

            def __enter__(self) -> _Into:
                return self

            def __exit__(self, *exc: Any) -> None:
                pass

            def update(self, n: float | None = 1) -> None:
                self.done += int(n or 0)
                group.report(name, self.done, self.total)

            def close(self) -> None:
                pass

        return _Into

    def close(self) -> None:
        self._bar.close()
