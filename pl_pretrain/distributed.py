"""Who fetches, who waits, and how a failure reaches every rank.

The protocol (docs/architecture.md, "The distributed protocol"), with `torch.distributed` only:

1. Every rank checks in: it posts its description (what it means to collect, given as a callable)
   to the job's store and waits, at most the default process group's timeout, for every other
   rank's. A rank that never arrives (dead, raised before, or not calling) ends every rank with an
   error naming it; a rank whose description differs ends every rank with an error naming the
   rank and the field. Nothing long-lived is created before every rank has arrived.
2. The fetching rank (global rank 0, or the first rank of each node whose folder is not shared)
   runs the work inside ``try``; nobody else runs it.
3. Every rank then joins one ``all_gather_object`` on a gloo group whose timeout is long (hours,
   not the process group's 30 minutes): that is the barrier, and it carries each fetcher's outcome,
   a value or an error record. It is the only long wait (`pl_pretrain.liveness` ends it, and the
   fetch, when a rank falls silent); every other exchange is bounded.
4. If any fetcher failed, every rank raises the same `PretrainerError` at once, with the root
   cause and the other ranks' causes; otherwise every rank takes the value of its own fetcher.

A gloo group notices a peer process that dies (its sockets close), so a crashed fetcher ends the
wait with an error too, instead of a hang.

Nodes that do not see rank 0's folder, under ``per_node="auto"`` with a `Relay`, do not fetch: once
rank 0's work is done, its output is streamed to the first rank of each such node
(`pl_pretrain.stream`, a chain of those ranks on a short-timeout gloo group of their own), so the
job reads from the source once.

This module knows nothing about files, loadables or Lightning: what "the work" is, how to tell
whether two ranks share a folder, and what the work's output is as bytes to stream (`Relay`) are
given to it as callables.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import pathlib
import socket
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import torch.distributed as dist

from pl_pretrain._constants import DEFAULT_COLLECT_TIMEOUT, collect_timeout, launcher_world_size
from pl_pretrain.errors import (
    ConfigurationError,
    PretrainerError,
    error_from_record,
    record_for,
    root_cause_order,
)
from pl_pretrain.liveness import Watch
from pl_pretrain.rendezvous import compare, default_timeout, exchange
from pl_pretrain.stream import Receiver, stream_to_nodes

__all__ = [
    "Topology",
    "SharedProbe",
    "Relay",
    "topology",
    "is_distributed",
    "run_once",
    "run_everywhere",
    "broadcast_object",
    "global_rank",
    "as_per_node",
    "close",
    "DEFAULT_TIMEOUT",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)

DEFAULT_TIMEOUT = DEFAULT_COLLECT_TIMEOUT
"""How long ranks wait for the fetching rank (overridden by ``PL_PRETRAIN_COLLECT_TIMEOUT`` or per call)."""

PerNode = bool | Literal["auto"]


def as_per_node(value: object) -> PerNode:
    """Returns `value` if it is a valid ``collect_per_node`` (True, False or "auto"); raises otherwise."""
    if value is True or value is False or value == "auto":
        return value
    raise ConfigurationError(
        f"collect_per_node={value!r} must be True, False or 'auto'.",
        hint="'auto' fetches once per job (streaming to nodes that do not share the folder); True once per node.",
    )


class SharedProbe(Protocol):
    """Tells whether ranks share a place: one rank marks it, the others look for the mark."""

    def mark(self) -> str | None:
        """Leaves a fresh mark and returns its token (None when nothing could be marked)."""

    def sees(self, token: str) -> bool:
        """Returns True when this rank sees the mark `token`."""

    def clear(self, token: str) -> None:
        """Removes the mark `token`."""


class Relay(Protocol[T_contra]):
    """How the fetcher's output travels, as bytes, to nodes that do not see its folder."""

    def outgoing(self, value: T_contra) -> Sequence[tuple[Any, pathlib.Path]]:
        """On the fetching rank: (label, path) of every file to send (labels must pickle)."""

    def receiver(self, value: T_contra) -> Receiver:
        """On the first rank of a receiving node: where the files go."""

    def received(self, value: T_contra) -> Any:
        """On every rank of a receiving node, once the files arrived: the value to use there instead of `value`."""


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

    Raises `ConfigurationError` when a launcher started several processes (``WORLD_SIZE``,
    ``OMPI_COMM_WORLD_SIZE``, ``PMI_SIZE`` or an ``srun`` task's ``SLURM_NTASKS`` above 1) but nobody
    initialised `torch.distributed`: fetching on every rank then is exactly the race this library
    exists to avoid.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    launched = launcher_world_size()
    if launched is not None:
        name, world = launched
        raise ConfigurationError(
            f"{name}={world} but torch.distributed is not initialised, so ranks cannot agree on who fetches.",
            hint="Call torch.distributed.init_process_group() before collect_files(internal_ddp_handling=True), "
            "or use PretrainerCallback in a Lightning Trainer.",
        )
    return False


def _node_key() -> str:
    # The launcher's node rank tells simulated nodes on one host apart; the host name tells real
    # nodes apart when no launcher variable is set. LOCAL_RANK is not used: it repeats across nodes.
    node_rank = os.environ.get("GROUP_RANK") or os.environ.get("NODE_RANK") or os.environ.get("SLURM_NODEID") or ""
    return f"{socket.gethostname()}|{node_rank.strip()}"


def _topology_of(node_keys: list[str]) -> Topology:
    order: dict[str, int] = {}
    for key in node_keys:
        order.setdefault(key, len(order))
    return Topology(rank=dist.get_rank(), world_size=len(node_keys), node_of=tuple(order[k] for k in node_keys))


def topology(group: Any = None) -> Topology:
    """Returns this job's `Topology` (a bounded exchange between every rank when distributed).

    `group` is accepted for compatibility and ignored: the exchange goes through the job's store.
    """
    if not is_distributed():
        return Topology(rank=0, world_size=1, node_of=(0,))
    return _topology_of(exchange(_node_key(), "the topology exchange", default_timeout()))


def _check_in(
    describe: Callable[[], Mapping[str, Any]] | None, timeout: datetime.timedelta | float | None
) -> tuple[Topology, datetime.timedelta]:
    """Returns (the topology, the wait for fetches) once every rank arrived with the same description.

    A rank's own failure to describe itself (a bad timeout, a condition that raises) travels to
    every rank like a fetch error; so does any difference between two ranks' descriptions.
    """
    rank = dist.get_rank()

    def describe_here() -> tuple[datetime.timedelta, dict[str, Any]]:
        wait = collect_timeout(timeout)
        return wait, {"collect timeout (s)": wait.total_seconds(), **(describe() if describe is not None else {})}

    state, value, local_error = _attempt(describe_here, rank)
    arrivals = exchange((_node_key(), (state, value)), "the collection", default_timeout())
    _raise_first_error([outcome for _, outcome in arrivals], local_error)
    compare([outcome[1][1] for _, outcome in arrivals])
    return _topology_of([node for node, _ in arrivals]), value[0]


# ------------------------------------------------------------------------------------------------
# The long wait, on its own gloo group
# ------------------------------------------------------------------------------------------------

# One long-timeout gloo group per default process group, made once every rank has checked in.
_WAIT_GROUPS: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
_set_pg_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)


def _wait_group(bound: datetime.timedelta, wanted: datetime.timedelta) -> Any:
    world = dist.group.WORLD
    cached = _WAIT_GROUPS.get(world)
    if cached is None:
        # Its rendezvous waits for every rank: bounded, in case one died since it checked in. The
        # long timeout is set afterwards, for the wait on fetches alone.
        with _lost_contact("the creation of the wait group"):
            group = dist.new_group(backend="gloo", timeout=bound if _set_pg_timeout is not None else wanted)
        cached = _WAIT_GROUPS[world] = [bound if _set_pg_timeout is not None else wanted, group]
    if cached[0] != wanted and _set_pg_timeout is not None:
        _set_pg_timeout(wanted, cached[1])
        cached[0] = wanted
    return cached[1]


def close() -> None:
    """Destroys the wait group (at exit, or before the default process group is destroyed); idempotent."""
    for world in list(_WAIT_GROUPS):
        _, group = _WAIT_GROUPS.pop(world)
        with contextlib.suppress(Exception):  # already gone with the default group
            if dist.is_initialized():
                dist.destroy_process_group(group)


# A gloo group torn down by the interpreter's final garbage collection, after the default group or
# with its threads still running, can abort the process ("terminate called without an active exception").
atexit.register(close)


def _gather(value: Any, group: Any, what: str, watch: Watch | None = None) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    with _lost_contact(what, watch):
        dist.all_gather_object(out, value, group=group)
    return out


@contextlib.contextmanager
def _lost_contact(what: str, watch: Watch | None = None) -> Iterator[None]:
    """Turns a collective that broke (a peer died, a timeout) into one clear PretrainerError."""
    try:
        yield
    except PretrainerError:
        raise
    except RuntimeError as error:
        raw = str(error)
        logger.debug("A collective failed while waiting for %s: %s", what, raw)
        why = (
            "the wait timed out"
            if "timeout" in raw.lower() or "timed out" in raw.lower()
            else "a peer closed its connection"
        )
        lost = watch.verdict() if watch is not None else []
        if lost:
            why += f" (rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} died or stopped)"
        raise PretrainerError(
            f"Lost contact with the other ranks while waiting for {what}: {why}.",
            rank=lost[0] if lost else global_rank(),
            hint="Another rank probably crashed (killed, out of memory); its own log says why.",
        ) from error


def _attempt(work: Callable[[], T], rank: int) -> tuple[str, Any, BaseException | None]:
    try:
        return ("ok", work(), None)
    except Exception as error:  # every failure must reach the other ranks, whatever its type
        return ("error", record_for(error, rank=rank), error)


def _round(
    work: Callable[[], T], rank: int, runs: bool, group: Any, *, share_value: bool = True, what: str = "the fetch"
) -> tuple[list[Any], Any]:
    """Returns (every rank's outcome, this rank's value) once `work` ran where `runs`; a failure anywhere raises everywhere.

    Each outcome is ``None`` for a rank that did not run, else ``(state, value)``; with
    `share_value` False only errors travel (the value stays on its rank).
    """
    # While the work runs (a download may take hours), every rank shows signs of life, and a rank
    # that works stops when a peer falls silent instead of learning of it at the gather.
    with Watch(default_timeout(), working=runs) as watch:
        state, value, local_error = _attempt(lambda: watch.run(work), rank) if runs else ("idle", None, None)
        if watch.lost and local_error is not None:
            raise local_error  # no gather can complete without the lost rank; the others learn of it from the store
        shared = (state, value if share_value or state == "error" else None) if runs else None
        outcomes = _gather(shared, group, what, watch)
    _raise_first_error(outcomes, local_error)
    return outcomes, value


def _raise_first_error(outcomes: list[Any], local_error: BaseException | None) -> None:
    """Raises the root cause among the failed outcomes, listing the other ranks' causes after it."""
    failures = [o[1] for o in outcomes if o is not None and o[0] == "error"]
    if not failures:
        return
    failures.sort(key=lambda r: (root_cause_order(r["type"]), r["rank"] if r["rank"] is not None else len(outcomes)))
    error = error_from_record(failures[0])
    others: dict[str, list[str]] = {}
    for record in failures[1:]:
        text = f"{record['type']}: {record['message'].splitlines()[0][:200]}" if record["message"] else record["type"]
        others.setdefault(text, []).append(str(record["rank"]))
    if others:
        causes = [f"rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}: {text}" for text, ranks in others.items()]
        shown = "; ".join(causes[:4]) + (f"; and {len(causes) - 4} more" if len(causes) > 4 else "")
        error.message = f"{error.message.rstrip()} (Other ranks failed too: {shown})"
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
    describe: Callable[[], Mapping[str, Any]] | None = None,
    relay: Relay[T] | None = None,
) -> T:
    """Returns the value of `work`, run by the fetching rank(s) only, on every rank.

    Args:
        work: what the fetching rank does (download, copy, link). Its value must pickle.
        per_node: False: global rank 0 works for the whole job. True: the first rank of each node
            works for its node. "auto": nodes that see `probe`'s mark from rank 0 share rank 0's
            work; the others get its output streamed by `relay` (or, without one, work for themselves).
        probe: how to tell whether a node shares rank 0's folder (only used with "auto").
        check: run by every rank on the value it received; a node where it returns False gets its
            own fetch (with "auto") or is an error (otherwise).
        timeout: how long to wait for the fetching rank(s); see `DEFAULT_TIMEOUT`.
        relay: what rank 0's value is as files, and what a node that received them uses instead.
        describe: what this rank means to do, as field -> value (values compared with ``==``);
            run on every rank before anything else, and compared between ranks.

    Raises:
        PretrainerError: on every rank, when a rank did not arrive within the default process
            group's timeout (naming it), when `describe` failed or differs between ranks (a
            `ConfigurationError` naming the rank and the field), when any fetching rank failed, or
            when a rank of the stream failed, died or stopped (naming it).
    """
    if not is_distributed():
        collect_timeout(timeout)  # a bad value is an error with one process too
        if describe is not None:
            describe()
        return work()

    topo, wait = _check_in(describe, timeout)
    bound = default_timeout()
    group = _wait_group(bound, wait)
    rank = topo.rank
    fetch_for_node = _nodes_that_fetch(topo, per_node, probe, bound)
    streamed = [False] * topo.num_nodes
    if per_node == "auto" and relay is not None:
        streamed, fetch_for_node = fetch_for_node, streamed

    def fetcher_of(r: int) -> int:
        node = topo.node_of[r]
        return topo.leader(node) if fetch_for_node[node] else 0

    outcomes, _ = _round(work, rank, fetcher_of(rank) == rank, group)
    mine = outcomes[fetcher_of(rank)][1]
    if relay is not None and any(streamed):
        mine = _stream(relay, mine, topo, streamed, timeout)

    if check is None:
        return mine

    seen = exchange(bool(_safe_check(check, mine)), "the check of the collected files", bound)
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
    seen = exchange(bool(_safe_check(check, mine)), "the check of the collected files", bound)
    if not all(seen):
        blind_rank = seen.index(False)
        raise PretrainerError(
            f"Rank {blind_rank} cannot read the files its node collected for it.",
            rank=blind_rank,
            hint="Check that the collection folder is writable and readable on every node.",
        )
    return mine


def _stream(relay: Relay[T], value: T, topo: Topology, streamed: list[bool], timeout: Any) -> T:
    """Returns the value to use here once rank 0's files reached the first rank of every `streamed` node."""
    chain = [0] + [topo.leader(node) for node in range(topo.num_nodes) if streamed[node]]
    stream_to_nodes(
        chain,
        (lambda: relay.outgoing(value)) if topo.rank == 0 else None,
        (lambda: relay.receiver(value)) if topo.rank in chain[1:] else None,
        wait=collect_timeout(timeout),
    )
    return relay.received(value) if streamed[topo.node] else value


def _safe_check(check: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(check(value))
    except Exception:  # an unreadable path is a "no", and the caller reports it
        return False


def _nodes_that_fetch(
    topo: Topology, per_node: PerNode, probe: SharedProbe | None, bound: datetime.timedelta
) -> list[bool]:
    """Returns, per node, whether its first rank fetches for it (else rank 0 does)."""
    if topo.num_nodes == 1 or per_node is False:
        return [False] * topo.num_nodes
    if per_node is True or probe is None:
        return [n != 0 for n in range(topo.num_nodes)]
    token: Any = None
    if topo.rank == 0:
        try:
            token = probe.mark()
        except Exception as error:  # an unwritable folder fails the fetch itself, with a clear error
            logger.debug("Could not mark the collection folder: %s", error)
    token = exchange(token, "the shared-folder probe", bound)[0]
    sees = bool(token is not None and _safe_check(probe.sees, token))
    seen = exchange(sees, "the shared-folder probe", bound)
    if topo.rank == 0 and token is not None:
        try:
            probe.clear(token)
        except Exception as error:
            logger.debug("Could not remove the mark %s: %s", token, error)
    return [node != 0 and not all(seen[r] for r in topo.ranks_on(node)) for node in range(topo.num_nodes)]


def run_everywhere(work: Callable[[], T], *, timeout: datetime.timedelta | float | None = None) -> T:
    """Returns `work()`, run on every rank; if it fails on any rank, every rank raises that error.

    The wait outlives a slow load on another rank (the collection's wait, not the process group's
    timeout); a rank that dies meanwhile ends it at once (gloo notices closed sockets).

    Raises:
        PretrainerError: on every rank, naming the root cause's rank and listing the others.
    """
    if not is_distributed():
        return work()
    group = _wait_group(default_timeout(), collect_timeout(timeout))
    _, value = _round(work, dist.get_rank(), True, group, share_value=False, what="the other ranks' loads")
    return value


def broadcast_object(value: Any, src: int = 0, *, timeout: datetime.timedelta | float | None = None) -> Any:
    """Returns rank `src`'s `value` on every rank (the value itself when not distributed); bounded by the default timeout.

    `timeout` is accepted for compatibility; the exchange is bounded by the default process group's.
    """
    if not is_distributed():
        return value
    return exchange(value if dist.get_rank() == src else None, "a broadcast", default_timeout())[src]


def global_rank() -> int:
    """Returns this process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
