"""Plain PyTorch under torchrun (no Lightning): the same guarantees through the Pretrainer.

    torchrun --standalone --nproc_per_node=2 examples/torchrun_finetune.py

Every rank calls `collect_files(internal_ddp_handling=True)`: rank 0 collects, the others wait for
it (however long the download takes), a failure on rank 0 is raised on every rank, and then every
rank loads the same file before DDP wraps the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib

import torch
import torch.distributed as dist
from tiny_model import KeywordClassifier, keywords
from torch.nn.parallel import DistributedDataParallel

from pl_pretrain import Pretrainer, TransferOptions

HERE = pathlib.Path(__file__).resolve().parent


def fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source",
        default=str(HERE / "assets" / "tiny-kws" / "pretrained.ckpt"),
        help="where the encoder comes from: a file path, a URL or a hub org/repo/file",
    )
    parser.add_argument("--collect-in", default=str(HERE / "runs" / "torchrun" / "pretrained"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--record", default=None, help="folder to write what each rank loaded (for tests)")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank = dist.get_rank()
    torch.manual_seed(rank)  # every rank starts from different weights: the load must make them equal
    model = KeywordClassifier(num_classes=4)

    pretrainer = Pretrainer(
        collect_in=args.collect_in,
        loadables={"encoder": model.encoder},
        paths={"encoder": args.source},
        transfer_options={"encoder": TransferOptions(key_map={"encoder.": ""})},
    )
    pretrainer.collect_files(internal_ddp_handling=True)
    reports = pretrainer.load_collected()
    loaded = fingerprint(model.encoder)
    if rank == 0:
        print(
            f"rank 0 loaded {len(reports['encoder'].loaded)} tensors from {pretrainer.provenance()['encoder']['location']}"
        )

    ddp = DistributedDataParallel(model)
    data = keywords(4, 64, seed=3, offset=10)
    sampler = torch.utils.data.DistributedSampler(data)
    batches = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    step = 0
    while step < args.steps:
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == args.steps:
                break
    if rank == 0:
        print(f"fine-tuned {args.steps} steps on {dist.get_world_size()} ranks, last loss {loss.item():.3f}")
    if args.record:
        os.makedirs(args.record, exist_ok=True)
        with open(os.path.join(args.record, f"rank{rank}.json"), "w") as f:
            json.dump(
                {
                    "rank": rank,
                    "loaded": loaded,
                    "trained": fingerprint(model.encoder),
                    "paths": {k: str(v) for k, v in pretrainer.loadable_paths.items()},
                },
                f,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
