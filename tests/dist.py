"""A multi-process harness: N real ranks on gloo, on CPU, bounded by a timeout.

`run_ranks(fn, world_size)` starts `world_size` fresh Python processes (spawn), initialises gloo in
each through a ``file://`` store (no ports, so parallel tests cannot collide), runs
``fn(rank, *args)`` and returns what each rank returned or raised, as `RankResult`s. A rank that
is still running at the deadline is killed and reported; the test fails with every rank's
traceback, never hangs.

Simulated nodes: ``nodes=2`` splits the ranks into consecutive blocks and gives each block its own
``NODE_RANK``/``LOCAL_RANK``; ``private=[path]`` additionally gives each node its own empty tmpfs
mounted at `path` (a mount namespace per node, as root), so the nodes do not share that folder.
"""

from __future__ import annotations

import ctypes
import datetime
import multiprocessing as mp
import os
import pickle
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

_CLONE_NEWNS = 0x00020000


@dataclass
class RankResult:
    """What one rank did: its return value or its error, and when it finished."""

    rank: int
    ok: bool
    value: Any = None
    error: BaseException | None = None
    error_type: str = ""
    error_text: str = ""
    traceback: str = ""
    finished_at: float = 0.0  # time.time() at the end of fn


class RanksFailed(AssertionError):
    pass


def can_unshare() -> bool:
    """True when this process may create mount namespaces (root on Linux)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0 and os.path.exists("/proc/self/ns/mnt")


def _private_mounts(paths: Sequence[str]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    for path in paths:
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", path], check=True)


def _rank_main(fn, rank, world_size, args, store, out_dir, env, pg_timeout_s) -> None:
    os.environ.update(env)
    result = RankResult(rank=rank, ok=False)
    try:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        try:
            result.value = fn(rank, *args)
            result.ok = True
        finally:
            result.finished_at = time.time()
    except BaseException as error:  # report everything, SystemExit included
        result.finished_at = result.finished_at or time.time()
        result.error_type = type(error).__name__
        result.error_text = str(error)
        result.traceback = traceback.format_exc()
        try:
            pickle.dumps(error)
            result.error = error
        except Exception:
            result.error = None
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(result, f)
    os.replace(path + ".tmp", path)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


def _node_main(ranks, private, timeout) -> None:
    _private_mounts(private)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=rank_args) for rank_args in ranks]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: Sequence[Any] = (),
    timeout: float = 120.0,
    nodes: int = 1,
    private: Sequence[str] = (),
    env: dict[str, str] | None = None,
    rank_env: Callable[[int], dict[str, str]] | None = None,
    pg_timeout_s: float = 60.0,
    check: bool = True,
    until_reported: Sequence[int] = (),
) -> list[RankResult]:
    """Returns every rank's `RankResult` of ``fn(rank, *args)`` run on `world_size` gloo ranks.

    Args:
        fn: a module-level function (it is pickled by reference into fresh processes).
        world_size: number of ranks.
        args: extra arguments, pickled to every rank.
        timeout: seconds for the whole run; ranks still alive then are killed and reported.
        nodes: number of simulated nodes (ranks split in consecutive blocks).
        private: folders each simulated node gets its own empty tmpfs for (needs root).
        env: environment variables for every rank.
        rank_env: per-rank extra environment variables.
        pg_timeout_s: the default process group's timeout (short, to prove nothing relies on it).
        check: raise `RanksFailed` if a rank did not report at all (killed or crashed).
        until_reported: ranks whose reports end the run: once each of them has reported, ranks still
            alive are killed (a rank that stays away from the collection need not be waited out).
    """
    if world_size % nodes:
        raise ValueError("world_size must be a multiple of nodes")
    per_node = world_size // nodes
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="pl_pretrain_dist_") as tmp:
        store = os.path.join(tmp, "store")
        out_dir = os.path.join(tmp, "out")
        os.makedirs(out_dir)
        all_args = []
        for rank in range(world_size):
            node = rank // per_node
            rank_vars = {
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(rank % per_node),
                "LOCAL_WORLD_SIZE": str(per_node),
                "NODE_RANK": str(node),
                "GROUP_RANK": str(node),
                **(env or {}),
                **(rank_env(rank) if rank_env else {}),
            }
            all_args.append((fn, rank, world_size, tuple(args), store, out_dir, rank_vars, pg_timeout_s))
        if private:
            procs = [
                ctx.Process(
                    target=_node_main, args=(all_args[n * per_node : (n + 1) * per_node], list(private), timeout)
                )
                for n in range(nodes)
            ]
        else:
            procs = [ctx.Process(target=_rank_main, args=a) for a in all_args]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        if until_reported and not private:
            reports = [os.path.join(out_dir, f"rank{rank}.pkl") for rank in until_reported]
            while time.monotonic() < deadline and any(p.is_alive() for p in procs):
                if all(os.path.exists(path) for path in reports):
                    for rank in until_reported:  # their teardown; the ranks still away are killed below
                        procs[rank].join(max(0.0, min(deadline, time.monotonic() + 10) - time.monotonic()))
                    deadline = time.monotonic()
                    break
                time.sleep(0.2)
        for p in procs:
            p.join(max(0.0, deadline + (5 if private else 0) - time.monotonic()))
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
        for p in hung:
            p.join(5)
        results = []
        missing = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    results.append(pickle.load(f))
            else:
                missing.append(rank)
                results.append(RankResult(rank=rank, ok=False, error_type="NoReport", error_text="rank did not report"))
        if check and (hung or missing):
            details = "\n".join(f"--- rank {r.rank}: {r.error_type} {r.error_text}\n{r.traceback}" for r in results)
            raise RanksFailed(
                f"{len(missing)} rank(s) never reported {missing} ({'timeout' if hung else 'crash'} after {timeout}s)\n{details}"
            )
        return results


def assert_all_ok(results: list[RankResult]) -> list[Any]:
    """Returns every rank's value, or fails with every failing rank's traceback."""
    bad = [r for r in results if not r.ok]
    if bad:
        details = "\n".join(f"--- rank {r.rank}: {r.error_type}: {r.error_text}\n{r.traceback}" for r in bad)
        raise RanksFailed(f"{len(bad)} of {len(results)} ranks failed:\n{details}")
    return [r.value for r in results]
