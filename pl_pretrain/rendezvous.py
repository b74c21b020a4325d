"""How ranks meet: bounded exchanges through the job's store, and the comparison of what each rank means to do.

A collective (``all_gather``) on a process group waits as long as the group's timeout and cannot say
which rank is missing; a wait on the job's store (the one every launcher sets up) has a timeout of
our choosing, and afterwards the store says which ranks never posted. Every exchange but the wait
for a fetch in progress goes through here, bounded by the default process group's timeout.
"""

from __future__ import annotations

import datetime
import pickle
import weakref
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

from pl_pretrain.errors import ConfigurationError, PretrainerError

__all__ = ["exchange", "default_timeout", "compare", "store"]


# Exchanges are numbered per default process group; every rank makes them in the same order.
_ROUNDS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def store() -> Any:
    """Returns the job's store (the default process group's)."""
    # The store every launcher already set up (torchrun's agent, env://, file://, Lightning's):
    # unlike a collective, a wait on it has a timeout of our choosing and can say who never posted.
    return dist.distributed_c10d._get_default_store()


def default_timeout() -> datetime.timedelta:
    """Returns the default process group's timeout: the most any exchange but the wait for a fetch may take."""
    try:
        bound = store().timeout
    except Exception:  # a store without a timeout (MPI): torch's own default
        return dist.default_pg_timeout
    return bound if isinstance(bound, datetime.timedelta) and bound.total_seconds() > 0 else dist.default_pg_timeout


def exchange(value: Any, what: str, bound: datetime.timedelta) -> list[Any]:
    """Returns every rank's `value`, exchanged through the store within `bound`; a rank that did not post is named."""
    world = dist.group.WORLD
    number = _ROUNDS.get(world, 0) + 1
    _ROUNDS[world] = number
    rank, size = dist.get_rank(), dist.get_world_size()
    keys = [f"pl_pretrain/{number}/{r}" for r in range(size)]
    held = None
    try:
        held = store()
        held.set(keys[rank], pickle.dumps(value))
        held.wait(keys, bound)
        return [pickle.loads(held.get(key)) for key in keys]
    except Exception as error:  # a timeout, or a store that is gone with the process holding it
        raise _missing_ranks(held, keys, what, bound) from error


def _missing_ranks(store: Any, keys: list[str], what: str, bound: datetime.timedelta) -> PretrainerError:
    try:
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
    except Exception:
        missing = []
    if not missing:
        return PretrainerError(
            f"Lost contact with the job's store while waiting for the other ranks to join {what}: the process "
            "holding it (rank 0 when ranks are started by hand, else the launcher) is gone.",
            rank=dist.get_rank(),
            hint="Rank 0 probably crashed (killed, out of memory); its own log says why.",
        )
    names = ", ".join(str(r) for r in missing)
    return PretrainerError(
        f"Rank{'s' if len(missing) > 1 else ''} {names} did not join {what} within "
        f"{bound.total_seconds():g} s (the default process group's timeout): "
        f"{'they' if len(missing) > 1 else 'it'} died, raised before, or never called it.",
        rank=missing[0],
        hint="Every rank must call collect_files(internal_ddp_handling=True) (or run the Trainer) together; "
        "the missing ranks' own logs say why they did not.",
    )


_ABSENT = object()


def compare(descriptions: list[dict[str, Any]]) -> None:
    """Raises `ConfigurationError` naming the first rank and field whose description differs from rank 0's."""
    first = descriptions[0]
    for rank, other in enumerate(descriptions[1:], start=1):
        for field in [*first, *(f for f in other if f not in first)]:
            mine, theirs = first.get(field, _ABSENT), other.get(field, _ABSENT)
            if mine != theirs:
                key, difference = _difference(mine, theirs, rank)
                raise ConfigurationError(
                    f"Rank {rank} is configured differently from rank 0 in {field}: {difference}.",
                    key=key,
                    rank=rank,
                    hint="Every rank must collect the same loadables from the same sources into the same folder: "
                    "compare the ranks' code, config files and environment variables.",
                )


def _difference(mine: Any, theirs: Any, rank: int) -> tuple[str | None, str]:
    """Returns (the first key that differs, the difference in words) between rank 0's value and `rank`'s."""

    def show(value: Any) -> str:
        return "nothing" if value is _ABSENT else repr(value)

    if not (isinstance(mine, Mapping) and isinstance(theirs, Mapping)):
        return None, f"{show(theirs)} on rank {rank}, {show(mine)} on rank 0"
    parts = []
    for key in [*mine, *(k for k in theirs if k not in mine)]:
        a, b = mine.get(key, _ABSENT), theirs.get(key, _ABSENT)
        if a != b:
            parts.append((key, f"{key!r} is {show(b)} on rank {rank}, {show(a)} on rank 0"))
    key = parts[0][0] if parts and isinstance(parts[0][0], str) else None
    return key, "; ".join(text for _, text in parts[:3]) + ("; ..." if len(parts) > 3 else "")
