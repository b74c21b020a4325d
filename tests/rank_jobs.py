"""What each rank runs in the multi-process tests (module level, so spawn can import it).

Every job returns what its rank saw: the paths it was given, a fingerprint of the weights it
loaded, or the error it raised with its text and the time it raised it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from helpers import digest, module

from pl_pretrain import FetchConfig, LocalStrategy, Pretrainer, PretrainerError


def _outcome(rank: int, cell: dict[str, Any]) -> dict[str, Any]:
    if cell.get("late_rank") == rank:
        time.sleep(cell.get("delay", 2.0))
    encoder = module(seed=1000 + rank)  # every rank starts from different weights
    pretrainer = Pretrainer(
        cell["collect_in"],
        {"encoder": encoder},
        paths=cell.get("paths"),
        custom_hooks=_hooks(rank, cell),
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
        }
    return {
        "error": None,
        "paths": {k: str(v) for k, v in paths.items()},
        "digest": digest(encoder),
        "started": started,
        "finished": time.time(),
    }


def _hooks(rank: int, cell: dict[str, Any]) -> dict[str, Any] | None:
    if cell.get("hook_fails_on") is None:
        return None
    failing = cell["hook_fails_on"]

    def hook(obj, path):
        if rank == failing:
            raise KeyError(f"layer missing on rank {rank}")
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
