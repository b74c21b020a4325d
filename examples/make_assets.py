"""Rebuilds examples/assets/tiny-kws/pretrained.ckpt: the pretrained checkpoint the examples load.

The file ships with the repository, so the examples run offline; this script shows where it came
from. It pretrains `KeywordClassifier` on 10 synthetic keywords and saves a Lightning checkpoint
(weights only). Rebuilding it on another machine may change its bytes, and so its sha256, which
examples/finetune.py pins: update both together.

    python examples/make_assets.py
"""

from __future__ import annotations

import hashlib
import pathlib

import lightning as L
from tiny_model import KeywordClassifier, keywords, loader

OUT = pathlib.Path(__file__).parent / "assets" / "tiny-kws" / "pretrained.ckpt"


def main() -> None:
    L.seed_everything(0, verbose=False)
    model = KeywordClassifier(num_classes=10, lr=0.05)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=15,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader(keywords(10, 4000, seed=1), shuffle=True), loader(keywords(10, 1000, seed=2)))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(OUT, weights_only=True)
    print(f"val_acc {trainer.callback_metrics['val_acc']:.3f}")
    print(f"wrote {OUT} sha256:{hashlib.sha256(OUT.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
