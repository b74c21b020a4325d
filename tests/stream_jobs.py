"""What each rank runs in the stream tests (module level, so spawn can import it).

Every rank of the chain is a "node" of its own: the sender streams files from its folder, each
receiver places them in a folder of its own through the real `Arrival` (temporary file, checks,
fsync, rename, record). Every rank returns what it holds, or the error it raised.
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import os
import pathlib
import subprocess
import time
from typing import Any

import torch.distributed as dist

from pl_pretrain import FetchError, PretrainerError
from pl_pretrain.fetching import Fetched, FetchFrom
from pl_pretrain.fetching.arrival import Arrival, holds


def _status_kib(*fields: str) -> list[int]:
    """This process's /proc/self/status `fields` (VmRSS, VmHWM, RssAnon, RssFile), in KiB."""
    status = dict(
        line.split(":", 1) for line in pathlib.Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return [int(status[field].split()[0]) for field in fields]


def _memory_kib() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in KiB."""
    rss, peak = _status_kib("VmRSS", "VmHWM")
    return rss, peak


def start_measuring() -> int:
    """Returns this process's RSS in KiB after giving freed memory back and resetting its peak (Linux)."""
    # Memory freed by earlier work but kept by malloc would be reused unseen: give it back first,
    # so that the measure sees every buffer the stream touches.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _memory_kib()[0]


def warm_up(root: str, chain: list[int], chunk: int) -> dict[str, int]:
    """Streams a small file (two chunks, the last one short) once, on every rank of the job together.

    The first stream in a process also pays one-time costs that are not the stream's memory: the
    pages of libtorch's and gloo's code read in on first use (RssFile, shared with every process
    on the machine) and torch's lazy set-up. Returns what that first stream added, in KiB: its peak
    RSS growth and the file-backed part of it.
    """
    from pl_pretrain import stream

    rank = dist.get_rank()
    folder = pathlib.Path(root) / f"warm-up-{rank}"
    if rank == chain[0]:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "warm-up.bin").write_bytes(os.urandom(chunk + 1))
    base = start_measuring()
    (file_before,) = _status_kib("RssFile")
    stream.stream_to_nodes(
        chain,
        (lambda: [({"name": "warm-up.bin"}, folder / "warm-up.bin")]) if rank == chain[0] else None,
        (lambda: FolderReceiver(folder)) if rank in chain[1:] else None,
        wait=datetime.timedelta(seconds=120),
        chunk_size=chunk,
    )
    peak, file_after = _status_kib("VmHWM", "RssFile")
    return {"peak_growth_kib": peak - base, "file_growth_kib": file_after - file_before}


class FolderReceiver:
    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder

    def wants(self, label: Any, size: int) -> bool:
        return not holds(self.folder, label["name"], _like(label, size))

    def open(self, label: Any, size: int) -> Arrival:
        return Arrival(self.folder, label["name"], _like(label, size), size)


def _like(label: dict[str, Any], size: int) -> Fetched:
    return Fetched(
        pathlib.Path(label["name"]),
        FetchFrom.URI,
        "http://origin",
        label["name"],
        "http://origin/" + label["name"],
        sha256=label.get("sha256"),
        size=size,
    )


def stream_files(
    rank: int,
    root: str,
    names: list[str],
    chain: list[int],
    chunk: int,
    known_sha256: bool = False,
    list_fails: bool = False,
    warmed_up: bool = False,
) -> dict[str, Any]:
    """Rank chain[0] sends root/sender/<name>; the other ranks of the chain receive into root/rank<r>/.

    With `known_sha256` the sender announces each file's sha256, so a receiver that holds it already skips it.
    With `list_fails` the sender cannot make its list of files (what a shard missing from the
    collection folder does in the Pretrainer). With `warmed_up` a small stream runs first (`warm_up`),
    so that the peak memory growth returned is the measured stream's own.
    """
    from pl_pretrain import stream
    from pl_pretrain.fetching import file_sha256

    sender = pathlib.Path(root) / "sender"
    mine = pathlib.Path(root) / f"rank{rank}"

    def items() -> list[tuple[dict[str, Any], pathlib.Path]]:
        if list_fails:
            raise FetchError(f"The shard '{sender / names[0]}' is not in the collection folder.", key="encoder")
        return [({"name": n, "sha256": file_sha256(sender / n) if known_sha256 else None}, sender / n) for n in names]

    if os.environ.get("PL_PRETRAIN_TEST_STREAM_FAULT", "").startswith("stop:"):
        # This rank will stop itself (SIGSTOP) mid-stream; something outside it must wake it later,
        # so that the run ends without waiting for the harness to kill it.
        subprocess.Popen(["sh", "-c", f"sleep 25; kill -CONT {os.getpid()}"])
    first_stream = warm_up(root, chain, chunk) if warmed_up else None
    base = start_measuring()
    started = time.time()
    try:
        stream.stream_to_nodes(
            chain,
            items if rank == chain[0] else None,
            (lambda: FolderReceiver(mine)) if rank in chain[1:] else None,
            wait=datetime.timedelta(seconds=120),
            chunk_size=chunk,
        )
    except PretrainerError as error:
        return {
            "error": type(error).__name__,
            "text": str(error),
            "rank_in_error": error.rank,
            "raised_at": time.time(),
            "started": started,
        }
    finished = time.time()
    _, peak = _memory_kib()
    held, inodes = {}, {}
    if rank in chain[1:]:
        for n in names:
            held[n] = hashlib.sha256((mine / n).read_bytes()).hexdigest() if (mine / n).exists() else None
            inodes[n] = (mine / n).stat().st_ino if (mine / n).exists() else None
    return {
        "error": None,
        "held": held,
        "inodes": inodes,
        "started": started,
        "finished": finished,
        "peak_growth_kib": peak - base,
        "first_stream": first_stream,
        "leftovers": sorted(p.name for p in mine.glob(".*.tmp")) if mine.exists() else [],
    }
