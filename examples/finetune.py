"""The main job: fine-tune a keyword classifier on CPU with a pretrained encoder, on 2 ranks.

The encoder's weights come from examples/assets/tiny-kws/pretrained.ckpt (a Lightning checkpoint
that ships with the repository) through `PretrainerCallback`: rank 0 collects the file, the other
rank waits, both load it before DDP wraps the model, and the report says what was loaded.

    python examples/finetune.py                    # 2 ranks (DDP, gloo), about 30 s
    python examples/finetune.py --devices 1        # one process
    python examples/finetune.py --from-scratch     # the same job without pretrained weights
    srun python examples/finetune.py --accelerator gpu --num-nodes 2 --devices 4   # see examples/slurm/
"""

from __future__ import annotations

import argparse
import json
import pathlib

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from tiny_model import KeywordClassifier, keywords, loader

from pl_pretrain import PretrainerCallback

HERE = pathlib.Path(__file__).resolve().parent
PRETRAINED = HERE / "assets" / "tiny-kws" / "pretrained.ckpt"
PRETRAINED_SHA256 = "sha256:e9def5f3e2ca650dbc3285a8f89766c039ea705393228b3ce473ff75607fe5ea"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2, help="processes per node (one per GPU under SLURM)")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes (under SLURM: the job's node count)")
    parser.add_argument("--accelerator", default="cpu", help="cpu, gpu, ... (Lightning's names)")
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "runs" / "finetune")
    parser.add_argument("--from-scratch", action="store_true", help="skip the pretrained weights (for comparison)")
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    model = KeywordClassifier(num_classes=4)
    callbacks = []
    if not args.from_scratch:
        callbacks.append(
            PretrainerCallback(
                collect_in=args.out / "pretrained",
                loadables={"encoder": "encoder"},  # an attribute of the LightningModule
                paths={"encoder": str(PRETRAINED)},
                checksums={"encoder": PRETRAINED_SHA256},
                # The file is a whole pretraining LightningModule: take its "encoder." tensors.
                transfer_options={"encoder": {"key_map": {"encoder.": ""}}},
            )
        )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy="ddp" if args.devices * args.num_nodes > 1 else "auto",
        max_epochs=args.max_epochs,
        callbacks=callbacks,
        default_root_dir=args.out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # A new task: 4 keywords the encoder never saw, and only 24 labelled examples.
    train = loader(keywords(4, 24, seed=3, offset=10), shuffle=True)
    val = loader(keywords(4, 800, seed=4, offset=10))
    trainer.fit(model, train, val)

    accuracy = float(trainer.callback_metrics["val_acc"])
    rank_zero_info(f"validation accuracy after fine-tuning: {accuracy:.3f}")
    if callbacks and trainer.is_global_zero:
        provenance = callbacks[0].provenance["encoder"]
        summary = {k: provenance[k] for k in ("location", "sha256", "size")}
        summary["loaded"] = len(provenance["report"]["loaded"])
        rank_zero_info("pretrained encoder: " + json.dumps(summary))
        (args.out / "result.json").write_text(json.dumps({"val_acc": accuracy, "encoder": summary}, indent=1))


if __name__ == "__main__":
    main()
