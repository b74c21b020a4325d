"""A Lightning fine-tune under ModelParallelStrategy on CPU, launched by tests/test_sharded.py as a subprocess.

    python sharded_job.py --sources SOURCES.json --collect-in DIR --devices N --dp D --tp T

The model (tests/sharded_models.py) is built on the meta device in ``configure_model``, tensor-
parallel over ``tp`` ranks and FSDP2-sharded over ``dp`` ranks; the PretrainerCallback loads four
parts from four formats and leaves the head to its own initialisation. Every rank writes
``$PL_PRETRAIN_RECORD_DIR/train_start-rank<r>.json`` (does each tensor equal the file, the head,
the reports) and ``train_end-rank<r>.json`` (did training change the weights), or
``error-rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from sharded_models import PARTS, Net, check_loaded, full_state, reference_state, shard  # noqa: E402

from pl_pretrain import PretrainerCallback, PretrainerError  # noqa: E402

RECORDS = pathlib.Path(os.environ.get("PL_PRETRAIN_RECORD_DIR", "."))


def write(name: str, rank: int, value: dict) -> None:
    RECORDS.mkdir(parents=True, exist_ok=True)
    (RECORDS / f"{name}-rank{rank}.json").write_text(json.dumps(value))


class ShardedFineTune(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model: Net | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        with torch.device("meta"):  # nothing is allocated until the shards are
            self.model = Net()
        mesh = self.device_mesh
        shard(self.model, mesh["data_parallel"], mesh["tensor_parallel"])

    def on_train_start(self) -> None:
        callback = next(c for c in self.trainer.callbacks if isinstance(c, PretrainerCallback))
        record = check_loaded(self.model)
        record["reports"] = {k: r.to_dict() if r is not None else None for k, r in callback.reports.items()}
        record["world_size"] = self.trainer.world_size
        write("train_start", self.global_rank, record)

    def on_train_end(self) -> None:
        want, full = reference_state(), full_state(self.model)
        changed = [name for name in want if not name.startswith("head.") and not torch.equal(full[name], want[name])]
        write("train_end", self.global_rank, {"changed": changed, "steps": self.trainer.global_step})

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        assert torch.isfinite(loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 8, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sources", required=True, help="JSON: part -> path")
    parser.add_argument("--collect-in", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args()

    paths = json.loads(pathlib.Path(args.sources).read_text())
    callback = PretrainerCallback(
        collect_in=args.collect_in,
        loadables={part: f"model.{part}" for part in PARTS},
        paths=paths,
        transfer_options={part: {"strict": args.strict} for part in PARTS},
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=ModelParallelStrategy(data_parallel_size=args.dp, tensor_parallel_size=args.tp),
        max_steps=2,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(RECORDS),
    )
    try:
        trainer.fit(ShardedFineTune())
    except PretrainerError as error:
        write("error", trainer.global_rank, {"type": type(error).__name__, "text": str(error), "key": error.key})
        sys.exit(3)


if __name__ == "__main__":
    main()
