"""A Lightning fit of the SpeechBrain system of tests/speechbrain_system.py, its Pretrainer from the YAML.

The inference YAML (with the Pretrainer tag given by --tag) is loaded by HyperPyYAML; its
``pretrainer`` goes to `PretrainerCallback`. Every rank saves the `snapshot` of what it holds
when training starts (before the first step) to ``<out>/rank<r>.pt``. Launched by the tests as
a subprocess: Lightning's ddp re-executes this script for the other rank.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from speechbrain_system import OUR_PRETRAINER, batch, load_yaml, snapshot, use_torchaudio_stand_in  # noqa: E402

use_torchaudio_stand_in()

import lightning as L  # noqa: E402
import torch  # noqa: E402

from pl_pretrain import PretrainerCallback  # noqa: E402


class SpeechBrainSystem(L.LightningModule):
    def __init__(self, hparams: dict, out: pathlib.Path) -> None:
        super().__init__()
        self.sb = hparams
        self.model = hparams["model"]
        self.normalizer = hparams["normalizer"]
        self.out = out

    def on_train_start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(snapshot(self.sb), self.out / f"rank{self.global_rank}.pt")

    def training_step(self, data, index):
        x, lengths, labels = data
        logits = self.model(self.normalizer(x, lengths)).mean(dim=1)
        return torch.nn.functional.cross_entropy(logits, labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch(seed=5, n=8)), batch_size=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", required=True)
    parser.add_argument("--save-folder", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tag", default=OUR_PRETRAINER)
    args = parser.parse_args()

    hparams = load_yaml(args.tag, args.save_folder)
    trainer = L.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=2,
        max_steps=2,
        callbacks=[PretrainerCallback(hparams["pretrainer"], default_source=args.repo)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=args.out,
    )
    trainer.fit(SpeechBrainSystem(hparams, pathlib.Path(args.out)))


if __name__ == "__main__":
    main()
