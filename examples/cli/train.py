"""LightningCLI entry point for the YAML example.

python examples/cli/train.py fit --config examples/cli/config.yaml
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from tiny_model import KeywordClassifier, keywords, loader  # noqa: E402


class Keywords(L.LightningDataModule):
    """A few labelled examples of new keywords (see tiny_model.keywords)."""

    def __init__(self, num_classes: int = 4, train_samples: int = 24) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.train_samples = train_samples

    def train_dataloader(self):
        return loader(keywords(self.num_classes, self.train_samples, seed=3, offset=10), shuffle=True)

    def val_dataloader(self):
        return loader(keywords(self.num_classes, 800, seed=4, offset=10))


def main() -> None:
    LightningCLI(KeywordClassifier, Keywords, save_config_callback=None)


if __name__ == "__main__":
    main()
