"""One rank of a job started by hand: no torchrun agent, an ``env://`` rendezvous through
MASTER_ADDR/MASTER_PORT (rank 0 holds the store), as ``srun`` or a shell loop starts ranks.

    python rank_by_hand.py SPEC OUT        # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set

SPEC (JSON) gives the collection (collect_in, source), the process group's timeout, and what each
rank does instead of collecting ("absent": {rank: "die" | "raise" | "stay away"}). The rank writes
what it saw to OUT/rank<r>.json: the error it raised, its text, and how long it took.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import sys
import time

import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from helpers import module  # noqa: E402

from pl_pretrain import Pretrainer, PretrainerError  # noqa: E402


def main() -> None:
    spec = json.loads(pathlib.Path(sys.argv[1]).read_text())
    out = pathlib.Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=spec["pg_timeout_s"]))
    dist.barrier()  # every rank is past the rendezvous of init_process_group (else that, not us, fails)
    what = spec.get("absent", {}).get(str(rank))
    if what == "die":
        os._exit(9)
    if what == "raise":
        raise RuntimeError(f"rank {rank} failed before the collection")
    if what == "stay away":
        time.sleep(600)
    started = time.monotonic()
    record: dict = {"rank": rank}
    try:
        Pretrainer(spec["collect_in"], {"encoder": module(seed=rank)}).collect_files(
            default_source=spec["source"], internal_ddp_handling=True
        )
        record["error"] = None
    except PretrainerError as error:
        record.update(error=type(error).__name__, text=str(error), rank_in_error=error.rank)
    record["waited_s"] = time.monotonic() - started
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
