"""A sharded checkpoint's shards, fetched at once: a bounded pool of threads and one progress bar for them all.

``FetchConfig(parallel_shards=)`` threads (default 8) each run one `fetch_file`: every shard keeps
its own lock, record and checks; Hub shards go through ``hf_hub_download``, as one file would. The
first shard that fails stops the others (URL downloads stop at their next chunk and keep their
partial files; queued shards never start) and is the error raised.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
from collections.abc import Callable, Sequence

from pl_pretrain.errors import PretrainerError
from pl_pretrain.fetching.fetch import _fetch, _has_own_place
from pl_pretrain.fetching.network import ProgressGroup
from pl_pretrain.fetching.sources import FetchConfig, Fetched, FetchSource, LocalStrategy, as_fetch_config

__all__ = ["fetch_shards"]


def fetch_shards(
    names: Sequence[str],
    source: str | os.PathLike | FetchSource,
    folder: str,
    shard_dir: pathlib.Path | None,
    index: pathlib.Path,
    strategy: LocalStrategy = LocalStrategy.SYMLINK,
    fetch_config: FetchConfig | None = None,
    *,
    desc: str = "shards",
    on_failure: Callable[[PretrainerError, str], None] | None = None,
) -> list[Fetched]:
    """Returns the shards `names` fetched from `source` (inside its `folder`), in the order given.

    Args:
        names: the shard file names the index lists.
        source: where the index came from; the shards sit beside it.
        folder: the index's folder inside the source (``""`` for its top).
        shard_dir: the folder to collect the shards into; ``None`` leaves them where they live,
            and puts URL shards (which live nowhere) beside the downloaded `index`.
        index: the local path of the index, already fetched.
        strategy: how shards are placed in `shard_dir`.
        fetch_config: see `FetchConfig`; ``parallel_shards`` bounds the threads.
        desc: the label of the progress bar.
        on_failure: called with the error of the first shard that failed and its name, before it is raised.
    """
    config = as_fetch_config(fetch_config)
    savedir: pathlib.Path | None = shard_dir
    if savedir is None and names and not _has_own_place(source, _inside(folder, names[0])):
        savedir, strategy = index.parent, LocalStrategy.NO_LINK  # URL shards: beside their index's download
    progress = ProgressGroup(f"{desc} ({len(names)} files)", config.progress)

    def one(name: str) -> Fetched:
        return _fetch(_inside(folder, name), source, savedir, name, strategy, config, progress=progress)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=config.parallel_shards) as pool:
            futures = {pool.submit(one, name): name for name in names}
            first: BaseException | None = None
            for future in concurrent.futures.as_completed(futures):
                error = None if future.cancelled() else future.exception()
                if error is not None and first is None:
                    first = error
                    if on_failure is not None and isinstance(error, PretrainerError):
                        on_failure(error, futures[future])
                    progress.cancelled.set()  # running downloads stop at their next chunk
                    for pending in futures:
                        pending.cancel()
            if first is not None:
                raise first
            return [future.result() for future in futures]
    finally:
        progress.close()


def _inside(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name
