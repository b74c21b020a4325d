"""Who fetches, who waits, and how a failure reaches every rank.

The protocol (docs/architecture.md, "The distributed protocol"), with `torch.distributed` only:

1. Every rank enters `run_once` together.
2. The fetching rank (global rank 0, or the first rank of each node whose folder is not shared)
   runs the work inside ``try``; nobody else runs it.
3. Every rank then joins one ``all_gather_object`` on a gloo group whose timeout is long (hours,
   not the process group's 30 minutes): that is the barrier, and it carries each fetcher's outcome,
   a value or an error record.
4. If any fetcher failed, every rank raises the same `PretrainerError` at once; otherwise every rank
   takes the value of its own fetcher.

A gloo group notices a peer process that dies (its sockets close), so a crashed fetcher ends the
wait with an error too, instead of a hang.

This module knows nothing about files, loadables or Lightning: what "the work" is, and how to tell
whether two ranks share a folder, are given to it as callables.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import torch.distributed as dist

from pl_pretrain._constants import DEFAULT_COLLECT_TIMEOUT, collect_timeout
from pl_pretrain.errors import ConfigurationError, PretrainerError, error_from_record, record_for

__all__ = [
    "Topology",
    "SharedProbe",
    "topology",
    "is_distributed",
    "run_once",
    "run_everywhere",
    "broadcast_object",
    "global_rank",
    "as_per_node",
    "DEFAULT_TIMEOUT",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT = DEFAULT_COLLECT_TIMEOUT
"""How long ranks wait for the fetching rank (overridden by ``PL_PRETRAIN_COLLECT_TIMEOUT`` or per call)."""

PerNode = bool | Literal["auto"]


def as_per_node(value: object) -> PerNode:
    """Returns `value` if it is a valid ``collect_per_node`` (True, False or "auto"); raises otherwise."""
    if value is True or value is False or value == "auto":
        return value
    raise ConfigurationError(
        f"collect_per_node={value!r} must be True, False or 'auto'.",
        hint="'auto' fetches once per job when the collection folder is shared, once per node otherwise.",
    )


class SharedProbe(Protocol):
    """Tells whether ranks share a place: one rank marks it, the others look for the mark."""

    def mark(self) -> str | None:
        """Leaves a fresh mark and returns its token (None when nothing could be marked)."""

    def sees(self, token: str) -> bool:
        """Returns True when this rank sees the mark `token`."""

    def clear(self, token: str) -> None:
        """Removes the mark `token`."""


@dataclass(frozen=True)
class Topology:
    """Ranks and nodes of the current job.

    Attributes:
        rank: this process's global rank.
        world_size: number of ranks.
        node_of: the node index of every global rank (nodes numbered by their lowest rank).
    """

    rank: int
    world_size: int
    node_of: tuple[int, ...]

    @property
    def node(self) -> int:
        return self.node_of[self.rank]

    @property
    def num_nodes(self) -> int:
        return max(self.node_of) + 1

    def leader(self, node: int) -> int:
        """Returns the lowest global rank on `node` (its fetcher when nodes do not share a folder)."""
        return self.node_of.index(node)

    def ranks_on(self, node: int) -> list[int]:
        return [r for r, n in enumerate(self.node_of) if n == node]


def is_distributed() -> bool:
    """Returns True when a process group with more than one rank is running.

    Raises `ConfigurationError` when a launcher started several ranks (``WORLD_SIZE > 1``) but
    nobody initialised `torch.distributed`: fetching on every rank then is exactly the race this
    library exists to avoid.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise ConfigurationError(
            f"WORLD_SIZE={world} but torch.distributed is not initialised, so ranks cannot agree on who fetches.",
            hint="Call torch.distributed.init_process_group() before collect_files(internal_ddp_handling=True), "
            "or use PretrainerCallback in a Lightning Trainer.",
        )
    return False


def _node_key() -> str:
    # The launcher's node rank tells simulated nodes on one host apart; the host name tells real
    # nodes apart when no launcher variable is set. LOCAL_RANK is not used: it repeats across nodes.
    node_rank = os.environ.get("GROUP_RANK") or os.environ.get("NODE_RANK") or os.environ.get("SLURM_NODEID") or ""
    return f"{socket.gethostname()}|{node_rank}"


def topology(group: Any = None) -> Topology:
    """Returns this job's `Topology` (a collective call when distributed)."""
    if not is_distributed():
        return Topology(rank=0, world_size=1, node_of=(0,))
    group = group if group is not None else _wait_group(None)
    keys: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(keys, _node_key(), group=group)
    order: dict[str, int] = {}
    for key in keys:
        order.setdefault(key, len(order))
    return Topology(rank=dist.get_rank(), world_size=len(keys), node_of=tuple(order[k] for k in keys))


# One long-timeout gloo group per default process group; creating it is itself a collective, so it
# is made once, at the first collection, by every rank together.
_WAIT_GROUPS: weakref.WeakKeyDictionary[Any, tuple[datetime.timedelta, Any]] = weakref.WeakKeyDictionary()


def _wait_group(timeout: datetime.timedelta | float | None) -> Any:
    wanted = collect_timeout(timeout)
    world = dist.group.WORLD
    cached = _WAIT_GROUPS.get(world)
    if cached is not None and cached[0] == wanted:
        return cached[1]
    group = dist.new_group(backend="gloo", timeout=wanted)
    _WAIT_GROUPS[world] = (wanted, group)
    return group


def _gather(value: Any, group: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    with _lost_contact():
        dist.all_gather_object(out, value, group=group)
    return out


@contextlib.contextmanager
def _lost_contact() -> Iterator[None]:
    """Turns a collective that broke (a peer died, a timeout) into one clear PretrainerError."""
    try:
        yield
    except PretrainerError:
        raise
    except RuntimeError as error:
        raise PretrainerError(
            f"Lost contact with the other ranks while waiting for the collection outcome: {str(error).splitlines()[0]}",
            rank=global_rank(),
            hint="Another rank probably crashed (killed, out of memory); its own log says why.",
        ) from error


def _attempt(work: Callable[[], T], rank: int) -> tuple[str, Any, BaseException | None]:
    try:
        return ("ok", work(), None)
    except Exception as error:  # every failure must reach the other ranks, whatever its type
        return ("error", record_for(error, rank=rank), error)


def _round(
    work: Callable[[], T], rank: int, runs: bool, group: Any, *, share_value: bool = True
) -> tuple[list[Any], Any]:
    """Returns (every rank's outcome, this rank's value) once `work` ran where `runs`; a failure anywhere raises everywhere.

    Each outcome is ``None`` for a rank that did not run, else ``(state, value)``; with
    `share_value` False only errors travel (the value stays on its rank).
    """
    state, value, local_error = _attempt(work, rank) if runs else ("idle", None, None)
    shared = (state, value if share_value or state == "error" else None) if runs else None
    outcomes = _gather(shared, group)
    _raise_first_error(outcomes, local_error)
    return outcomes, value


def _raise_first_error(outcomes: list[Any], local_error: BaseException | None) -> None:
    failures = [o for o in outcomes if o is not None and o[0] == "error"]
    if not failures:
        return
    record = min(failures, key=lambda o: o[1]["rank"])[1]
    error = error_from_record(record)
    if len(failures) > 1:
        error.message += f" ({len(failures) - 1} other rank(s) failed too.)"
    if local_error is not None:
        raise error from local_error
    raise error


def run_once(
    work: Callable[[], T],
    *,
    per_node: PerNode = "auto",
    probe: SharedProbe | None = None,
    check: Callable[[T], bool] | None = None,
    timeout: datetime.timedelta | float | None = None,
) -> T:
    """Returns the value of `work`, run by the fetching rank(s) only, on every rank.

    Args:
        work: what the fetching rank does (download, copy, link). Its value must pickle.
        per_node: False: global rank 0 works for the whole job. True: the first rank of each node
            works for its node. "auto": nodes that see `probe`'s mark from rank 0 share rank 0's
            work; the others work for themselves.
        probe: how to tell whether a node shares rank 0's folder (only used with "auto").
        check: run by every rank on the value it received; a node where it returns False gets its
            own fetch (with "auto") or is an error (otherwise).
        timeout: how long to wait for the fetching rank(s); see `DEFAULT_TIMEOUT`.

    Raises:
        PretrainerError: on every rank, when any fetching rank failed; it names that rank.
    """
    if not is_distributed():
        return work()

    group = _wait_group(timeout)
    topo = topology(group)
    rank = topo.rank
    fetch_for_node = _nodes_that_fetch(topo, per_node, probe, group)

    def fetcher_of(r: int) -> int:
        node = topo.node_of[r]
        return topo.leader(node) if fetch_for_node[node] else 0

    outcomes, _ = _round(work, rank, fetcher_of(rank) == rank, group)
    mine = outcomes[fetcher_of(rank)][1]

    if check is None:
        return mine

    seen = _gather(bool(_safe_check(check, mine)), group)
    blind_nodes = sorted({topo.node_of[r] for r, ok in enumerate(seen) if not ok})
    if not blind_nodes:
        return mine
    blind_rank = seen.index(False)
    if per_node != "auto" or any(fetch_for_node[n] for n in blind_nodes):
        raise PretrainerError(
            f"Rank {blind_rank} cannot read the files that rank {fetcher_of(blind_rank)} collected "
            f"(collect_per_node={per_node!r}).",
            rank=blind_rank,
            hint="The collection folder (or the cache it links into) is not shared between these ranks: "
            "use collect_per_node='auto' or True, or a folder every node sees.",
        )
    # Rank 0's folder turned out not to be visible on these nodes (the collection folder is
    # shared but the cache it links into is not, or the filesystem hid the mark): each such node
    # now fetches for itself.
    logger.warning(
        "Nodes %s cannot read the files rank 0 collected; their first ranks collect again for them. "
        "If the collection folder is shared but the cache is not, prefer LocalStrategy.COPY.",
        blind_nodes,
    )
    outcomes, _ = _round(work, rank, topo.node in blind_nodes and topo.leader(topo.node) == rank, group)
    if topo.node in blind_nodes:
        mine = outcomes[topo.leader(topo.node)][1]
    seen = _gather(bool(_safe_check(check, mine)), group)
    if not all(seen):
        blind_rank = seen.index(False)
        raise PretrainerError(
            f"Rank {blind_rank} cannot read the files its node collected for it.",
            rank=blind_rank,
            hint="Check that the collection folder is writable and readable on every node.",
        )
    return mine


def _safe_check(check: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(check(value))
    except Exception:  # an unreadable path is a "no", and the caller reports it
        return False


def _nodes_that_fetch(topo: Topology, per_node: PerNode, probe: SharedProbe | None, group: Any) -> list[bool]:
    """Returns, per node, whether its first rank fetches for it (else rank 0 does)."""
    if topo.num_nodes == 1 or per_node is False:
        return [False] * topo.num_nodes
    if per_node is True or probe is None:
        return [n != 0 for n in range(topo.num_nodes)]
    token_box: list[Any] = [None]
    if topo.rank == 0:
        try:
            token_box[0] = probe.mark()
        except Exception as error:  # an unwritable folder fails the fetch itself, with a clear error
            logger.debug("Could not mark the collection folder: %s", error)
    with _lost_contact():
        dist.broadcast_object_list(token_box, src=0, group=group)
    token = token_box[0]
    sees = bool(token is not None and _safe_check(probe.sees, token))
    seen = _gather(sees, group)
    if topo.rank == 0 and token is not None:
        try:
            probe.clear(token)
        except Exception as error:
            logger.debug("Could not remove the mark %s: %s", token, error)
    return [node != 0 and not all(seen[r] for r in topo.ranks_on(node)) for node in range(topo.num_nodes)]


def run_everywhere(work: Callable[[], T], *, timeout: datetime.timedelta | float | None = None) -> T:
    """Returns `work()`, run on every rank; if it fails on any rank, every rank raises that error.

    Raises:
        PretrainerError: on every rank, naming the lowest failing rank.
    """
    if not is_distributed():
        return work()
    _, value = _round(work, dist.get_rank(), True, _wait_group(timeout), share_value=False)
    return value


def broadcast_object(value: Any, src: int = 0, *, timeout: datetime.timedelta | float | None = None) -> Any:
    """Returns rank `src`'s `value` on every rank (the value itself when not distributed)."""
    if not is_distributed():
        return value
    box = [value]
    with _lost_contact():
        dist.broadcast_object_list(box, src=src, group=_wait_group(timeout))
    return box[0]


def global_rank() -> int:
    """Returns this process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
