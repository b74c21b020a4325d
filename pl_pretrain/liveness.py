"""Signs of life during a fetch round: every rank beats through the job's store, and a working rank stops when a peer falls silent.

The wait for a fetch is the one long wait (hours). A waiting rank that dies meanwhile closes its
sockets, but the fetching rank, busy downloading, touches no socket of the wait group until its
work ends, so it would learn of the death only then. During each round every rank adds to its own
counter in the store once a second; a rank that is working reads the others' counters, and a
counter that did not move for the default process group's timeout names a lost rank. The working
thread is then interrupted (`PeerLost`, raised in it at its next Python step: a download stops at
its next chunk, and discards or keeps its partial file as after any failure; nothing is placed).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import pickle
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import torch.distributed as dist

from pl_pretrain.errors import PretrainerError
from pl_pretrain.rendezvous import store

__all__ = ["PeerLost", "Watch", "lost_ranks_error"]

T = TypeVar("T")

_BEAT_S = 1.0  # how often a rank shows it is alive: one store operation per rank and second
_GRACE_S = 3.0  # after a broken collective, how long a rank looks for who fell silent

# Rounds are numbered per default process group; every rank makes them in the same order.
_ROUNDS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


class PeerLost(BaseException):
    """Raised inside the working thread when a peer fell silent.

    A BaseException, so that no ``except Exception`` on the way (a retry loop) swallows it.
    """


def lost_ranks_error(lost: list[int]) -> PretrainerError:
    """Returns the error a working rank raises when the ranks `lost` fell silent during a fetch round."""
    names = ", ".join(str(r) for r in lost)
    return PretrainerError(
        f"Rank{'s' if len(lost) > 1 else ''} {names} died or stopped during the fetch (no sign of life through the "
        "job's store): the fetch was stopped and nothing partial was placed.",
        rank=lost[0],
        hint="The lost rank's own log (or the kernel's, for a process killed out of memory) says why.",
    )


class Watch:
    """One fetch round's signs of life on this rank: beats, and (while `working`) watches the others."""

    def __init__(self, bound: datetime.timedelta, working: bool) -> None:
        world = dist.group.WORLD
        number = _ROUNDS.get(world, 0) + 1
        _ROUNDS[world] = number
        self._prefix = f"pl_pretrain/alive/{number}"
        self._lost_key = f"{self._prefix}/lost"
        self.rank, self._size = dist.get_rank(), dist.get_world_size()
        self.bound = bound.total_seconds()
        # Never fewer than five missed beats: a loaded machine may delay one thread for a few seconds.
        self._silence = max(self.bound, 5 * _BEAT_S)
        # Reading every counter costs one store operation per rank: often enough to notice within
        # the bound, seldom enough for a store that serves thousands of ranks.
        self._check_s = max(_BEAT_S, self.bound / 20)
        self.lost: list[int] = []
        self._store = store()
        self._lock = threading.Lock()
        self._target: int | None = threading.get_ident() if working else None
        self._interrupted = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pl_pretrain-liveness", daemon=True)

    def __enter__(self) -> Watch:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(2 * _BEAT_S)

    def run(self, work: Callable[[], T]) -> T:
        """Returns `work()`; raises the lost-ranks error when a peer fell silent while it ran."""
        try:
            try:
                return work()
            finally:
                self._done()
        except PeerLost:
            pass
        with self._lock:
            lost = list(self.lost)
        raise lost_ranks_error(lost) from None

    def verdict(self) -> list[int]:
        """Returns the ranks that fell silent, looking at most a few seconds (after a broken collective).

        What is found is posted for the ranks still working, so that they stop too.
        """
        try:
            deadline = time.monotonic() + _GRACE_S
            first = self._counters()
            while time.monotonic() < deadline:
                if (posted := self._posted()) is not None:
                    return posted
                time.sleep(_BEAT_S / 4)
            last = self._counters()
            moved = [r for r in first if last[r] != first[r]]
            silent = [r for r in first if last[r] == first[r]] if moved else []
            if silent:
                self._store.set(self._lost_key, pickle.dumps(silent))
            return silent
        except Exception:  # the store is gone too: nothing more to learn
            return []

    def _posted(self) -> list[int] | None:
        return list(pickle.loads(self._store.get(self._lost_key))) if self._store.check([self._lost_key]) else None

    def _key(self, rank: int) -> str:
        return f"{self._prefix}/{rank}"

    def _beat(self) -> None:
        self._store.add(self._key(self.rank), 1)

    def _counters(self) -> dict[int, int]:
        # add(key, 0) reads a counter without waiting for it to exist.
        return {r: self._store.add(self._key(r), 0) for r in range(self._size) if r != self.rank}

    def _done(self) -> None:
        with self._lock:
            target, self._target = self._target, None
            if target is not None and self._interrupted:
                # The interruption was set but the work ended first: it must not fire later, elsewhere.
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None)

    def _run(self) -> None:
        last_seen: dict[int, tuple[int | None, float]] = {}
        # The first reading waits one period: a short round (a load) reads no counter at all.
        next_check = time.monotonic() + self._check_s
        while not self._stop.wait(_BEAT_S):
            try:
                self._beat()
                if self._target is None or time.monotonic() < next_check:
                    continue
                now = next_check = time.monotonic()
                next_check += self._check_s
                for rank, count in self._counters().items():
                    if last_seen.get(rank, (None, 0.0))[0] != count:
                        last_seen[rank] = (count, now)
                silent = sorted(r for r, (_, since) in last_seen.items() if now - since > self._silence)
                silent = silent or self._posted() or []  # a waiting rank saw a peer's connection close
            except Exception:  # the store is gone (rank 0 died): the collective will say so
                return
            if silent:
                self._interrupt(silent)

    def _interrupt(self, silent: list[int]) -> None:
        with self._lock:
            if self._target is None or self._interrupted:
                return
            self.lost = silent
            with contextlib.suppress(Exception):  # the waiting ranks will look for themselves
                self._store.set(self._lost_key, pickle.dumps(silent))
            # The working thread may be deep in a download (urllib, huggingface_hub, fsspec): an
            # exception raised in it at its next Python step stops any of them, where a flag would
            # need every fetching path to look at it.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._target), ctypes.py_object(PeerLost))
            self._interrupted = True
