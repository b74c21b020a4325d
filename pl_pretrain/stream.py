"""Byte streams between nodes: one rank's files sent, chunk by chunk, to the first rank of every other node.

The ranks that take part form a chain (the sender first, then one rank per receiving node), joined
by a gloo group of their own whose timeout is short (`stream_timeout`, 60 s): each rank receives a
chunk from the rank before it and forwards it to the rank after it, so the sender sends every byte
once whatever the number of nodes, and the stream's time grows with the number of nodes only by one
chunk's time per hop. Each rank holds two chunks (one arriving while the other is forwarded and
written), so memory stays at ``2 x chunk`` whatever the file's size.

What travels is bytes: the sender reads files from paths, a receiver hands the bytes to sinks that
it opens itself (`Receiver`), and nothing here knows what the files mean. The sender computes each
file's sha256 as it reads and sends it after the last chunk; the sink checks its bytes against it
before it keeps them.

Failures: a rank that fails before the first byte (the sender cannot open a file or make its list,
a receiver cannot check what it holds) says so in the exchanges that start the stream, so every rank
of the chain stops at once; a rank that cannot read or write mid-stream keeps the chain going (it
sends zeros, or drops what it received) and reports its error at the end; a peer that dies or stops answering ends the stream on
its neighbours within the short timeout, and `stream_to_nodes` then makes every rank of the job
raise one `PretrainerError` that names the rank that failed first.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import pathlib
import pickle
import signal
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist

from pl_pretrain._constants import stream_chunk_size, stream_fault, stream_timeout
from pl_pretrain.errors import PretrainerError, error_from_record, record_for

__all__ = ["Sink", "Receiver", "relay", "stream_to_nodes"]

_OK, _SENDER_FAILED = 0, 1
_TRAILER = 1 + 32  # status byte + sha256


class Sink(Protocol):
    """Where one file's bytes go on a receiving rank."""

    def write(self, data: memoryview) -> None:
        """Takes the next bytes of the file."""

    def commit(self, sha256: str) -> None:
        """Keeps the file, once every byte arrived, if its bytes have the sender's `sha256`; raises otherwise."""

    def discard(self) -> None:
        """Drops whatever was written (the stream failed); leaves nothing at the destination."""


class Receiver(Protocol):
    """What a receiving rank does with the files announced by the sender (labels are the sender's, opaque here)."""

    def wants(self, label: Any, size: int) -> bool:
        """Returns False when this rank already holds the file `label` (it is then forwarded, not written)."""

    def open(self, label: Any, size: int) -> Sink:
        """Returns the sink for the file `label` of `size` bytes."""


@dataclass
class _Link:
    """This rank's place in the chain: who it receives from and who it forwards to (global ranks)."""

    group: Any
    prev: int | None
    next: int | None
    timeout: datetime.timedelta


class _LostPeer(PretrainerError):
    """A neighbour in the chain died or stopped answering (`rank` is that neighbour)."""


class _PeerFailed(_LostPeer):
    """Another rank of the chain failed before the first byte (`rank` is that rank); its own error is the root cause."""


def relay(
    chain: Sequence[int],
    group: Any,
    items: Callable[[], Sequence[tuple[Any, pathlib.Path]]] | None = None,
    receiver: Callable[[], Receiver] | None = None,
    *,
    chunk_size: int | None = None,
    timeout: datetime.timedelta | None = None,
) -> None:
    """Sends the sender's files from ``chain[0]`` to every other rank of `chain`, on each rank of the chain.

    The sender passes `items` (it gives the (label, path) of each file); every other rank passes
    `receiver` (it gives its `Receiver`). Returns once this rank has forwarded and placed everything.

    Raises:
        PretrainerError: this rank could not read, write or verify a file (after the stream went on
            for the others), another rank of the chain failed before the first byte (`rank` names
            it), or a neighbour died or stopped answering (`rank` names it).
    """
    rank = dist.get_rank()
    position = list(chain).index(rank)
    link = _Link(
        group,
        chain[position - 1] if position > 0 else None,
        chain[position + 1] if position + 1 < len(chain) else None,
        timeout or stream_timeout(),
    )
    chunk = chunk_size or stream_chunk_size()
    state = _State(fault=stream_fault())

    # A rank that fails before the first byte still takes part in the two small exchanges below,
    # with its error in place of its part: every rank of the chain then stops at once, instead of
    # waiting out the stream timeout for bytes that will never come.
    paths: list[pathlib.Path] = []
    files: list[tuple[Any, int]] = []
    sinks: Receiver | None = None
    mine: list[tuple[Any, int]] | _Failed = files
    try:
        if link.prev is None:
            for label, path in items() if items is not None else ():
                paths.append(path)
                files.append((label, _readable_size(path)))
        elif receiver is not None:
            sinks = receiver()
    except Exception as error:
        mine = _Failed(rank, error)
    manifest = _manifest(link, mine)
    if isinstance(manifest, _Failed):
        raise manifest.here(rank)
    wanted: list[bool] | _Failed = [False] * len(manifest)
    try:
        if isinstance(mine, _Failed):
            wanted = mine
        elif sinks is not None:
            wanted = [sinks.wants(label, size) for label, size in manifest]
    except Exception as error:
        wanted = _Failed(rank, error)
    everyone: list[Any] = [None] * len(chain)
    with _talking_to(link.next if link.prev is None else link.prev, "the list of files to stream"):
        dist.all_gather_object(everyone, wanted, group=group)
    failed = [part for part in everyone if isinstance(part, _Failed)]
    if failed:
        raise ([f for f in failed if f.rank == rank] or failed)[0].here(rank)
    assert not isinstance(wanted, _Failed)

    buffers = [torch.empty(chunk, dtype=torch.uint8) for _ in range(2)]
    for index, (label, size) in enumerate(manifest):
        if not any(flags[index] for flags in everyone):
            continue  # every node already holds it
        if link.prev is None:
            _send_file(link, paths[index], size, buffers, state)
        else:
            _pass_file(link, label, size, sinks if wanted[index] else None, buffers, state)
    if state.error is not None:
        raise state.error


class _Failed:
    """A rank's part of an exchange before the stream, when that rank failed: its error, as a record."""

    def __init__(self, rank: int, error: BaseException) -> None:
        self.rank = rank
        self.error: BaseException | None = error  # only on the rank that failed: it does not travel
        self.record = record_for(error, rank=rank)

    def __getstate__(self) -> dict[str, Any]:
        return {"rank": self.rank, "error": None, "record": self.record}

    def here(self, rank: int) -> PretrainerError:
        """Returns the error to raise on `rank`: the failure itself on the rank that failed, else a consequence of it."""
        if rank == self.rank:
            if isinstance(self.error, PretrainerError):
                return self.error
            own = error_from_record(self.record)
            own.__cause__ = self.error
            return own
        cause = error_from_record(self.record)
        return _PeerFailed(
            f"Rank {self.rank} failed before the collected files were streamed to the other nodes: "
            f"{cause.message.splitlines()[0] if cause.message else cause}",
            rank=self.rank,
            hint="That rank's own error is the root cause.",
        )


def _readable_size(path: pathlib.Path) -> int:
    """Returns the size of the file at `path`, once it opened for reading (so that a file that cannot be read fails now)."""
    try:
        with open(path, "rb", buffering=0) as source:
            return os.fstat(source.fileno()).st_size
    except OSError as error:
        raise PretrainerError(
            f"Could not open '{path}' to stream it to the other nodes: {error}",
            hint="The collected file must stay in place until every node has it; collect again.",
        ) from error


@dataclass
class _State:
    fault: tuple[str, int] | None
    chunks: int = 0
    error: PretrainerError | None = None

    def note(self, error: BaseException) -> None:
        if self.error is None:
            self.error = (
                error if isinstance(error, PretrainerError) else PretrainerError(f"{type(error).__name__}: {error}")
            )

    def at_chunk(self, data: memoryview, sending: bool) -> None:
        # The test hook (PL_PRETRAIN_TEST_STREAM_FAULT): a byte flipped after hashing is a corruption in transit.
        index, self.chunks = self.chunks, self.chunks + 1
        if self.fault is None or self.fault[1] != index:
            return
        what = self.fault[0]
        if what == "flip" and sending and len(data):
            data[0] ^= 0xFF
        elif what == "exit":
            os._exit(9)
        elif what == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)


def _manifest(link: _Link, mine: list[tuple[Any, int]] | _Failed) -> list[tuple[Any, int]] | _Failed:
    """Returns the sender's (label, size) list (or its failure) on every rank of the chain, passed along it."""
    if link.prev is None:
        payload = torch.frombuffer(bytearray(pickle.dumps(mine)), dtype=torch.uint8)
        length = torch.tensor([payload.numel()], dtype=torch.int64)
    else:
        length = torch.zeros(1, dtype=torch.int64)
        _wait(dist.irecv(length, src=link.prev, group=link.group), link, link.prev, "the list of files")
        payload = torch.empty(int(length.item()), dtype=torch.uint8)
        _wait(dist.irecv(payload, src=link.prev, group=link.group), link, link.prev, "the list of files")
    if link.next is not None:
        _wait(dist.isend(length, dst=link.next, group=link.group), link, link.next, "the list of files")
        _wait(dist.isend(payload, dst=link.next, group=link.group), link, link.next, "the list of files")
    return mine if link.prev is None else pickle.loads(payload.numpy().tobytes())


def _chunks(size: int, chunk: int) -> list[int]:
    return [min(chunk, size - start) for start in range(0, size, chunk)]


def _send_file(link: _Link, path: pathlib.Path, size: int, buffers: list[torch.Tensor], state: _State) -> None:
    digest = hashlib.sha256()
    sends: list[Any] = [None, None]
    failed: BaseException | None = None
    views = [b.numpy().data for b in buffers]
    assert link.next is not None
    with contextlib.ExitStack() as stack:
        try:
            source = stack.enter_context(open(path, "rb", buffering=0))
        except OSError as error:
            failed = error
        for k, length in enumerate(_chunks(size, buffers[0].numel())):
            b = k % 2
            _wait(sends[b], link, link.next, "a chunk")  # its buffer is free again
            view = views[b][:length]
            if failed is None:
                try:
                    _read_exactly(source, view, path)
                except OSError as error:
                    failed = error
            # After a failure the chain goes on with whatever the buffer holds: the trailer says it is void.
            digest.update(view)
            state.at_chunk(view, sending=True)
            sends[b] = dist.isend(buffers[b][:length], dst=link.next, group=link.group)
        for work in sends:
            _wait(work, link, link.next, "a chunk")
    trailer = torch.zeros(_TRAILER, dtype=torch.uint8)
    trailer[0] = _OK if failed is None else _SENDER_FAILED
    trailer[1:] = torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)
    _wait(dist.isend(trailer, dst=link.next, group=link.group), link, link.next, "the end of a file")
    if failed is not None:
        state.note(PretrainerError(f"Could not read '{path}' to stream it to the other nodes: {failed}"))


def _read_exactly(source: Any, view: memoryview, path: pathlib.Path) -> None:
    done = 0
    while done < len(view):
        got = source.readinto(view[done:])
        if not got:
            raise OSError(f"'{path}' ended {len(view) - done} bytes early: it changed while it was being streamed")
        done += got


def _pass_file(
    link: _Link, label: Any, size: int, receiver: Receiver | None, buffers: list[torch.Tensor], state: _State
) -> None:
    sink: Sink | None = None
    if receiver is not None:
        try:
            sink = receiver.open(label, size)
        except Exception as error:  # keep the chain going; report at the end
            state.note(error)
    assert link.prev is not None
    try:
        lengths = _chunks(size, buffers[0].numel())
        views = [b.numpy().data for b in buffers]
        sends: list[Any] = [None, None]
        recv = dist.irecv(buffers[0][: lengths[0]], src=link.prev, group=link.group) if lengths else None
        for k, length in enumerate(lengths):
            b = k % 2
            _wait(recv, link, link.prev, "a chunk")
            if k + 1 < len(lengths):
                _wait(sends[1 - b], link, link.next, "a chunk")
                recv = dist.irecv(buffers[1 - b][: lengths[k + 1]], src=link.prev, group=link.group)
            if link.next is not None:
                sends[b] = dist.isend(buffers[b][:length], dst=link.next, group=link.group)
            state.at_chunk(views[b][:length], sending=False)
            if sink is not None:
                try:
                    sink.write(views[b][:length])
                except Exception as error:
                    state.note(error)
                    sink.discard()
                    sink = None
        for work in sends:
            _wait(work, link, link.next, "a chunk")
        trailer = torch.zeros(_TRAILER, dtype=torch.uint8)
        _wait(dist.irecv(trailer, src=link.prev, group=link.group), link, link.prev, "the end of a file")
        if link.next is not None:
            _wait(dist.isend(trailer, dst=link.next, group=link.group), link, link.next, "the end of a file")
    except BaseException:
        if sink is not None:
            sink.discard()
        raise
    if sink is None:
        return
    if int(trailer[0]) != _OK:
        sink.discard()
        state.note(PretrainerError(f"Rank {link.prev} could not send a file to stream it on; nothing was placed."))
        return
    try:
        sink.commit(bytes(trailer[1:].tolist()).hex())
    except Exception as error:
        state.note(error)


def _wait(work: Any, link: _Link, peer: int | None, what: str) -> None:
    if work is None:
        return
    with _talking_to(peer, what):
        work.wait(link.timeout)


@contextlib.contextmanager
def _talking_to(peer: int | None, what: str) -> Any:
    try:
        yield
    except RuntimeError as error:
        raw = str(error).lower()
        why = "stopped answering" if "timeout" in raw or "timed out" in raw else "closed its connection (it died)"
        raise _LostPeer(
            f"Rank {peer} {why} while the collected files were streamed to the other nodes ({what}).",
            rank=peer,
            hint="That rank's own log says why; a rank that stops for longer than "
            f"PL_PRETRAIN_STREAM_TIMEOUT ({stream_timeout().total_seconds():g} s) counts as stopped.",
        ) from error


# ------------------------------------------------------------------------------------------------
# Every rank of the job: the group, the stream, and its outcome
# ------------------------------------------------------------------------------------------------

# Exchanges of outcomes are numbered per default process group; every rank makes them in the same order.
_ROUNDS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def stream_to_nodes(
    chain: Sequence[int],
    items: Callable[[], Sequence[tuple[Any, pathlib.Path]]] | None = None,
    receiver: Callable[[], Receiver] | None = None,
    *,
    wait: datetime.timedelta,
    chunk_size: int | None = None,
) -> None:
    """Streams the sender's files from ``chain[0]`` to the other ranks of `chain`; called by every rank of the job together.

    Args:
        chain: the sender's global rank, then one rank per receiving node.
        items: on the sender, gives the (label, path) of each file to send.
        receiver: on the other ranks of the chain, gives their `Receiver`.
        wait: how long a rank waits for the others while nobody failed (the stream's own length);
            once one rank has failed, the others are waited for only the stream timeout more.
        chunk_size: bytes per chunk (default `stream_chunk_size`).

    Raises:
        PretrainerError: on every rank, when any rank failed or died; it names the rank that failed first.
    """
    timeout = stream_timeout()
    # Made by every rank (a collective of the default group), used only by the chain's ranks.
    group = dist.new_group(ranks=list(chain), backend="gloo", timeout=timeout)
    rank = dist.get_rank()
    outcome: Any = None
    local_error: BaseException | None = None
    if rank in chain:
        try:
            relay(chain, group, items, receiver, chunk_size=chunk_size, timeout=timeout)
        except Exception as error:
            local_error = error
            outcome = (record_for(error, rank=rank), isinstance(error, _LostPeer))
        finally:
            with contextlib.suppress(Exception):  # a group with a dead member may refuse to be destroyed cleanly
                dist.destroy_process_group(group)
    outcomes = _fail_fast_exchange(outcome, wait, grace=timeout)
    _raise_root_cause(outcomes, chain, local_error)


_MISSING = object()


def _fail_fast_exchange(value: Any, wait: datetime.timedelta, grace: datetime.timedelta) -> list[Any]:
    """Returns every rank's `value` through the job's store; once one rank posted a failure, waits only `grace` more.

    Ranks that did not post in time are `_MISSING`: they died or stopped.
    """
    world = dist.group.WORLD
    number = _ROUNDS.get(world, 0) + 1
    _ROUNDS[world] = number
    size, rank = dist.get_world_size(), dist.get_rank()
    keys = [f"pl_pretrain/stream/{number}/{r}" for r in range(size)]
    try:
        return _collect(keys, rank, value, wait, grace)
    except PretrainerError:
        raise
    except Exception as error:  # the store went away with the process that held it
        raise PretrainerError(
            "Lost contact with the job's store while the collected files were streamed to the other nodes: "
            "the process holding it (rank 0 when ranks are started by hand, else the launcher) is gone.",
            rank=dist.get_rank(),
            hint="Rank 0 probably died (killed, out of memory); its own log says why.",
        ) from error


def _collect(keys: list[str], rank: int, value: Any, wait: datetime.timedelta, grace: datetime.timedelta) -> list[Any]:
    store = dist.distributed_c10d._get_default_store()
    size = len(keys)
    store.set(keys[rank], cast(Any, pickle.dumps(value)))  # the store takes bytes too
    seen: dict[int, Any] = {}
    deadline = time.monotonic() + wait.total_seconds()
    failed_at: float | None = None
    pause = 0.01
    while True:
        for r in range(size):
            if r not in seen and store.check([keys[r]]):
                seen[r] = pickle.loads(store.get(keys[r]))
                if seen[r] is not None and failed_at is None:
                    failed_at = time.monotonic()
        now = time.monotonic()
        if len(seen) == size or now > deadline or (failed_at is not None and now > failed_at + grace.total_seconds()):
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.25)
    return [seen.get(r, _MISSING) for r in range(size)]


def _raise_root_cause(outcomes: list[Any], chain: Sequence[int], local_error: BaseException | None) -> None:
    missing = [r for r, o in enumerate(outcomes) if o is _MISSING]
    failures = [o for o in outcomes if o is not _MISSING and o is not None]
    if not missing and not failures:
        return
    if missing:
        names = ", ".join(str(r) for r in missing)
        error = PretrainerError(
            f"Rank{'s' if len(missing) > 1 else ''} {names} died or stopped while the collected files were "
            "streamed to the other nodes; nothing partial was placed.",
            rank=missing[0],
            hint="The missing ranks' own logs say why (killed, out of memory, stopped).",
        )
    else:
        # A rank's own failure (a checksum, a disk) is the root cause; a lost neighbour follows from it,
        # and the neighbour nearest the sender is the one whose report is closest to the cause.
        own = [record for record, lost in failures if not lost]
        order = {r: i for i, r in enumerate(chain)}
        record = (own or [min((rec for rec, _ in failures), key=lambda rec: order.get(rec["rank"], len(chain)))])[0]
        error = error_from_record(record)
        if len(failures) > 1:
            error.message += f" ({len(failures) - 1} other rank(s) of the stream failed too.)"
    if local_error is not None:
        raise error from local_error
    raise error
