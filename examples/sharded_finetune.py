"""Fine-tune a sharded model: built on the meta device, FSDP2 (and tensor parallel), pretrained encoder.

The same keyword classifier as examples/finetune.py, the way large models are fine-tuned: nothing is
allocated in ``configure_model`` (the layers are built on ``meta``), Lightning's
``ModelParallelStrategy`` gives the device mesh, the encoder is tensor-parallel over the mesh's
``tensor_parallel`` dimension (``--tp 2``) and every part is ``fully_shard``-ed over its
``data_parallel`` one. `PretrainerCallback` materialises the layers, then fills each rank's shards
from the shipped Lightning checkpoint, each rank reading only its slice of every tensor; the new
head keeps its own initialisation.

    python examples/sharded_finetune.py                # 2 ranks, FSDP2 (gloo, CPU), about 40 s
    python examples/sharded_finetune.py --devices 4 --tp 2   # a 2-D mesh: data parallel 2 x tensor parallel 2
    srun python examples/sharded_finetune.py --accelerator gpu --devices 8 --tp 4

FSDP1 (``strategy="fsdp"``) cannot run on CPU; on GPUs the callback loads before it wraps the
model (dense tensors), which is not tested here.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from tiny_model import HIDDEN, Encoder, KeywordClassifier, keywords, loader
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from pl_pretrain import PretrainerCallback

HERE = pathlib.Path(__file__).resolve().parent
PRETRAINED = HERE / "assets" / "tiny-kws" / "pretrained.ckpt"


class ShardedKeywordClassifier(KeywordClassifier):
    """KeywordClassifier whose layers are built, on meta, and sharded in configure_model."""

    def __init__(self, num_classes: int = 4, lr: float = 0.05) -> None:
        L.LightningModule.__init__(self)  # not KeywordClassifier's: it would allocate the layers now
        self.save_hyperparameters({"num_classes": num_classes, "lr": lr})
        self.encoder: Encoder | None = None

    def configure_model(self) -> None:
        if self.encoder is not None:
            return
        with torch.device("meta"):
            self.encoder = Encoder()
            self.head = torch.nn.Linear(HIDDEN, self.hparams.num_classes)
        mesh = self.device_mesh
        if mesh["tensor_parallel"].size() > 1:
            plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
            parallelize_module(self.encoder.layers, mesh["tensor_parallel"], plan)
        for part in (self.encoder, self.head):
            fully_shard(part, mesh=mesh["data_parallel"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (the rest is data parallel)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "runs" / "sharded_finetune")
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    callback = PretrainerCallback(
        collect_in=args.out / "pretrained",
        loadables={"encoder": "encoder"},  # resolved after configure_model has built it
        paths={"encoder": str(PRETRAINED)},
        transfer_options={"encoder": {"key_map": {"encoder.": ""}, "strict": True}},
    )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=ModelParallelStrategy(data_parallel_size=args.devices // args.tp, tensor_parallel_size=args.tp),
        max_epochs=args.max_epochs,
        callbacks=[callback],
        default_root_dir=args.out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train = loader(keywords(4, 24, seed=3, offset=10), shuffle=True)
    val = loader(keywords(4, 800, seed=4, offset=10))
    trainer.fit(ShardedKeywordClassifier(num_classes=4), train, val)

    report = callback.reports["encoder"]
    accuracy = float(trainer.callback_metrics["val_acc"])
    rank_zero_info(
        f"validation accuracy after fine-tuning: {accuracy:.3f}; encoder: {len(report.loaded)} tensors, "
        f"{report.bytes} bytes in the file, {report.local_bytes} copied by rank 0"
    )
    result = {"rank": trainer.global_rank, "val_acc": accuracy, "loaded": report.loaded}
    result |= {"bytes": report.bytes, "local_bytes": report.local_bytes}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"result-rank{trainer.global_rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
