"""One rank of a hand-launched job that collects and then simply ends, with no
``destroy_process_group``, as many training scripts end. At exit it writes how many process
groups are still alive after pl_pretrain's own exit handler ran.

    python exit_without_teardown.py SOURCE_FOLDER OUT    # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set

A gloo group left to the interpreter's last garbage collection (after the default group, or with
its threads running) can abort the process with "terminate called without an active exception".
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import pathlib
import sys

OUT = pathlib.Path(sys.argv[2])


def _groups_left() -> None:
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    # No public API lists a job's groups; the registry every new_group adds to is the one to read.
    left = len(distributed_c10d._world.pg_map) if dist.is_initialized() else 0
    (OUT / f"exit-rank{os.environ['RANK']}.json").write_text(json.dumps({"groups_left": left}))


# Registered before pl_pretrain is imported: exit handlers run last-in first-out, so this one runs
# after pl_pretrain's, and sees what the interpreter's teardown would be left with.
atexit.register(_groups_left)

import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from helpers import module  # noqa: E402

from pl_pretrain import Pretrainer  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    Pretrainer(OUT / "collected", {"encoder": module(seed=rank)}).collect_files(
        default_source=sys.argv[1], internal_ddp_handling=True
    )
    (OUT / f"collected-rank{rank}.json").write_text(json.dumps({"ok": True}))


if __name__ == "__main__":
    main()
