"""Fine-tune with an encoder loaded from a Hugging Face Hub repo id.

The same job as examples/finetune.py, but the pretrained file is `<repo>/pretrained.ckpt` on the
Hub: rank 0 downloads it once (through huggingface_hub: its cache, ETags, HF_TOKEN, HF_ENDPOINT),
the file is linked into <out>/pretrained/encoder.ckpt, and every rank loads it. The revision (a
branch, tag or commit) is part of the collected file's identity, and the commit it resolved to is
recorded in the provenance.

    python examples/hub_finetune.py --repo pl-pretrain/tiny-kws --revision main
    HF_ENDPOINT=http://127.0.0.1:8000 python examples/hub_finetune.py    # a Hub mirror, as the test does
    pl-pretrain fetch encoder=pl-pretrain/tiny-kws/pretrained.ckpt --collect-in examples/runs/hub/pretrained
                                                  # collect ahead, then run with HF_HUB_OFFLINE=1
"""

from __future__ import annotations

import argparse
import json
import pathlib

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from tiny_model import KeywordClassifier, keywords, loader

from pl_pretrain import FetchConfig, PretrainerCallback

HERE = pathlib.Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default="pl-pretrain/tiny-kws", help="the Hub repo id that holds pretrained.ckpt")
    parser.add_argument("--revision", default="main", help="a branch, tag or commit of the repo")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "runs" / "hub")
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    model = KeywordClassifier(num_classes=4)
    pretrained = PretrainerCallback(
        collect_in=args.out / "pretrained",
        loadables={"encoder": "encoder"},
        paths={"encoder": f"{args.repo}/pretrained.ckpt"},  # org/repo/file: a Hub repo id
        fetch_config=FetchConfig(revision=args.revision),
        transfer_options={"encoder": {"key_map": {"encoder.": ""}}},  # the encoder of a whole LightningModule
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.max_epochs,
        callbacks=[pretrained],
        default_root_dir=args.out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        model, loader(keywords(4, 24, seed=3, offset=10), shuffle=True), loader(keywords(4, 800, seed=4, offset=10))
    )

    accuracy = float(trainer.callback_metrics["val_acc"])
    rank_zero_info(f"validation accuracy after fine-tuning: {accuracy:.3f}")
    if trainer.is_global_zero:
        provenance = pretrained.provenance["encoder"]
        summary = {k: provenance[k] for k in ("location", "revision", "commit", "sha256", "size")}
        summary["loaded"] = len(provenance["report"]["loaded"])
        rank_zero_info("pretrained encoder: " + json.dumps(summary))
        (args.out / "result.json").write_text(json.dumps({"val_acc": accuracy, "encoder": summary}, indent=1))


if __name__ == "__main__":
    main()
