"""What each rank runs in the multi-process tests (module level, so spawn can import it).

Every job returns what its rank saw: the paths it was given, a fingerprint of the weights it
loaded, or the error it raised with its text and the time it raised it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from helpers import digest, module

from pl_pretrain import ChecksumError, FetchConfig, LocalStrategy, Pretrainer, PretrainerError


def _outcome(rank: int, cell: dict[str, Any]) -> dict[str, Any]:
    if cell.get("late_rank") == rank:
        time.sleep(cell.get("delay", 2.0))
    encoder = module(seed=1000 + rank, dim=cell.get("dim", 8))  # every rank starts from different weights
    loadables = {"encoder": encoder, **{key: module(seed=2000 + rank) for key in cell.get("extra_keys", ())}}
    pretrainer = Pretrainer(
        cell["collect_in"],
        loadables,
        paths=cell.get("paths"),
        custom_hooks=_hooks(rank, cell),
        conditions=cell.get("conditions"),
        checksums=cell.get("checksums"),
    )
    started = time.time()
    try:
        paths = pretrainer.collect_files(
            default_source=cell.get("source"),
            internal_ddp_handling=True,
            local_strategy=LocalStrategy[cell.get("strategy", "SYMLINK")],
            fetch_config=FetchConfig(**cell.get("fetch_config", {})),
            collect_per_node=cell.get("per_node", "auto"),
        )
        pretrainer.load_collected()
    except PretrainerError as error:
        return {
            "error": type(error).__name__,
            "text": str(error),
            "key": error.key,
            "rank_in_error": error.rank,
            "value_error": isinstance(error, ValueError),
            "started": started,
            "raised_at": time.time(),
            **_what_is_placed(cell),
        }
    return {
        "error": None,
        "paths": {k: str(v) for k, v in paths.items()},
        "digest": digest(encoder),
        "started": started,
        "finished": time.time(),
    }


def _what_is_placed(cell: dict[str, Any]) -> dict[str, Any]:
    """What this rank sees in the collection folder: the loadable's file, and temporary files."""
    folder = cell.get("collect_in")
    if folder is None:
        return {}
    return {
        "placed": os.path.lexists(os.path.join(folder, "encoder.ckpt")),
        "temporary": sorted(p for p in os.listdir(folder) if p.endswith(".tmp")) if os.path.isdir(folder) else [],
    }


def _hooks(rank: int, cell: dict[str, Any]) -> dict[str, Any] | None:
    if cell.get("hook_fails_on") is None and cell.get("hook_errors") is None:
        return None
    failing = cell.get("hook_fails_on")
    errors = cell.get("hook_errors", {})

    def hook(obj, path):
        if rank == failing:
            raise KeyError(f"layer missing on rank {rank}")
        if errors.get(str(rank)) == "checksum":
            raise ChecksumError(f"'{path}' has sha256 {'0' * 64}, but sha256 {'f' * 64} was expected.")
        if errors.get(str(rank)) == "gone":  # what a rank sees when another removed the file under it
            raise FileNotFoundError(2, "No such file or directory", str(path))
        from pl_pretrain import torch_parameter_transfer

        return torch_parameter_transfer(obj, path)

    return {"encoder": hook}


def collect_cells(rank: int, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs every cell in turn on this rank; returns one outcome per cell."""
    return [_outcome(rank, cell) for cell in cells]


def collect_repeatedly(rank: int, cells: list[dict[str, Any]], repetitions: int) -> list[dict[str, Any]]:
    """Runs the cells `repetitions` times (the race test); returns every outcome."""
    return [_outcome(rank, cell) for _ in range(repetitions) for cell in cells]


def world_view(rank: int) -> dict[str, Any]:
    from pl_pretrain import distributed

    topo = distributed.topology()
    return {"rank": topo.rank, "node": topo.node, "nodes": topo.num_nodes, "node_of": topo.node_of, "pid": os.getpid()}


def crash_while_fetching(rank: int) -> dict[str, Any]:
    """Rank 0 dies in the middle of its work; the others must not hang."""
    from pl_pretrain import distributed

    def work():
        time.sleep(1.0)
        os._exit(7)

    started = time.time()
    try:
        distributed.run_once(work, per_node=False)
    except PretrainerError as error:
        return {"error": type(error).__name__, "text": str(error), "waited": time.time() - started}
    return {"error": None}


def collect_unless_absent(rank: int, cell: dict[str, Any], absent: dict[int, str]) -> dict[str, Any]:
    """Rank `rank` collects, unless `absent` says what it does instead, before any collection.

    "stay away": it lives on, doing other work, and never calls collect_files (until the harness
    kills it); "die": the process ends at once; "raise": it raises before collect_files.
    """
    what = absent.get(rank)
    if what == "stay away":
        time.sleep(600)
    elif what == "die":
        os._exit(9)
    elif what == "raise":
        raise RuntimeError(f"rank {rank} failed before the collection")
    return _outcome(rank, cell)


def collect_while_a_waiting_rank_is_killed(
    rank: int, cell: dict[str, Any], victim: int, after_s: float
) -> dict[str, Any]:
    """Every rank collects; rank `victim` (waiting, not fetching) is killed -9 `after_s` seconds after the download began."""
    import signal
    import threading

    def kill_once_the_download_runs() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _download_began(cell["collect_in"]):
            time.sleep(0.05)
        time.sleep(after_s)
        os.kill(os.getpid(), signal.SIGKILL)

    if rank == victim:
        threading.Thread(target=kill_once_the_download_runs, daemon=True).start()
    return _outcome(rank, cell)


def _download_began(folder: str) -> bool:
    # The fetching rank writes the body into a partial or temporary file as it arrives.
    return any(".partial" in name or name.endswith(".tmp") for _, _, names in os.walk(folder) for name in names)


def collect_drifting(rank: int, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs each cell, with the cell's ``drift[rank]`` (if any) merged over it on this rank only."""
    outcomes = []
    for cell in cells:
        mine = {**cell, **cell.get("drift", {}).get(str(rank), {})}
        outcomes.append(_outcome(rank, mine))
    return outcomes


def speechbrain_pattern(rank: int, cell: dict[str, Any]) -> dict[str, Any]:
    """SpeechBrain's ``run_on_main(collect_files)`` then ``load_collected()`` on every rank, with
    rank 0's copy damaged after it was verified; rank 0 loads last."""
    import pathlib

    import torch.distributed as dist

    pretrainer = Pretrainer(cell["collect_in"], {"encoder": module(seed=1000 + rank)}, checksums=cell["checksums"])
    path = pathlib.Path(cell["collect_in"]) / "encoder.ckpt"
    if rank == 0:
        pretrainer.collect_files(default_source=cell["source"], local_strategy=LocalStrategy.COPY)
        damaged = bytearray(path.read_bytes())
        damaged[-100] ^= 0xFF
        path.write_bytes(bytes(damaged))
    dist.barrier()
    if rank == 0:
        time.sleep(cell.get("fetcher_delay", 3.0))
    try:
        pretrainer.load_collected()
    except PretrainerError as error:
        return {"error": type(error).__name__, "text": str(error), "file_left": path.exists()}
    return {"error": None, "file_left": path.exists()}


def collect_then_wait(rank: int, cell: dict[str, Any]) -> dict[str, Any]:
    """Collects, says so with a marker file, waits for the test's "go", then loads."""
    import pathlib

    encoder = module(seed=1000 + rank)
    pretrainer = Pretrainer(cell["collect_in"], {"encoder": encoder}, paths={"encoder": cell["path"]})
    pretrainer.collect_files(
        internal_ddp_handling=True,
        local_strategy=LocalStrategy[cell["strategy"]],
        fetch_config=FetchConfig(revision=cell["revision"]),
    )
    markers = pathlib.Path(cell["markers"])
    (markers / f"collected-{rank}").write_text("")
    deadline = time.monotonic() + 90
    while not (markers / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        pretrainer.load_collected()
    except PretrainerError as error:
        return {"error": type(error).__name__, "text": str(error), "digest": digest(encoder)}
    return {"error": None, "digest": digest(encoder)}


def stale_copy_on_node_one(rank: int, cell: dict[str, Any], stale: bytes) -> dict[str, Any]:
    """Node 1's first rank finds a stale file (same size) where rank 0 collects, then every rank collects."""
    import pathlib

    if os.environ["NODE_RANK"] == "1" and os.environ["LOCAL_RANK"] == "0":
        folder = pathlib.Path(cell["collect_in"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "encoder.ckpt").write_bytes(stale)
    return _outcome(rank, cell)
