"""One of two torchrun jobs that collect into the same folder at once (tests/test_faults_processes.py).

    python -m torch.distributed.run --standalone --nproc_per_node=2 torchrun_collect.py SPEC.json OUT_DIR TAG

SPEC: ``{"collect_in", "paths": {key: path}, "strategy", "fetch_config", "start_together": DIR, "jobs": N}``.
Every rank waits (bounded) until all N jobs have started, so that their fetching ranks really
collect at the same moment; then it runs the distributed protocol and writes
``OUT_DIR/TAG-rank<r>.json``: the loaded weights' fingerprints, or the error it raised.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402
from helpers import digest, module  # noqa: E402

from pl_pretrain import FetchConfig, LocalStrategy, Pretrainer, PretrainerError  # noqa: E402


def start_together(folder: pathlib.Path, tag: str, jobs: int, timeout: float = 60.0) -> None:
    """Marks this job as started and waits until `jobs` jobs have (or `timeout` passes)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{tag}-{os.environ.get('RANK', '0')}").touch()
    deadline = time.monotonic() + timeout
    while len({p.name.rsplit("-", 1)[0] for p in folder.iterdir()}) < jobs and time.monotonic() < deadline:
        time.sleep(0.02)


def main() -> None:
    spec = json.loads(pathlib.Path(sys.argv[1]).read_text())
    out_dir, tag = pathlib.Path(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mods = {key: module(seed=500 + rank) for key in spec["paths"]}  # every rank starts from other weights
    pretrainer = Pretrainer(spec["collect_in"], mods, paths=spec["paths"])
    outcome: dict = {"rank": rank, "world_size": dist.get_world_size(), "error": None}
    start_together(pathlib.Path(spec["start_together"]), tag, spec.get("jobs", 2))
    outcome["started"] = time.time()
    try:
        pretrainer.collect_files(
            internal_ddp_handling=True,
            local_strategy=LocalStrategy[spec.get("strategy", "SYMLINK")],
            fetch_config=FetchConfig(**spec.get("fetch_config", {})),
        )
        pretrainer.load_collected()
        outcome["digests"] = {key: digest(mod) for key, mod in mods.items()}
    except PretrainerError as error:
        outcome.update(error=type(error).__name__, text=str(error))
    outcome["finished"] = time.time()
    (out_dir / f"{tag}-rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
