"""FSDP2 without Lightning: ``fully_shard`` a model under torchrun, then the Pretrainer loads each rank's shards.

    python -m torch.distributed.run --standalone --nproc_per_node=N torchrun_sharded.py SOURCES.json COLLECT_IN OUT_DIR

Every rank writes ``OUT_DIR/rank<r>.json``: does each tensor equal the file after the load, the
reports, and whether a training step ran on the loaded shards.
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from sharded_models import Net, check_loaded, shard  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

from pl_pretrain import Pretrainer  # noqa: E402


def main() -> None:
    sources, collect_in, out = json.loads(pathlib.Path(sys.argv[1]).read_text()), sys.argv[2], pathlib.Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)  # every rank starts from other weights
    net = shard(Net(), init_device_mesh("cpu", (dist.get_world_size(),)))
    pretrainer = Pretrainer(collect_in, {key: getattr(net, key) for key in sources}, paths=sources)
    pretrainer.collect_files(internal_ddp_handling=True)
    reports = pretrainer.load_collected()
    record = check_loaded(net)
    record["reports"] = {k: r.to_dict() for k, r in reports.items()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    loss = net(x).pow(2).mean()
    loss.backward()
    optimizer.step()
    record["loss"] = float(loss)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
