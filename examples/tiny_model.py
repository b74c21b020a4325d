"""The small model and synthetic data the examples fine-tune (CPU, seconds).

A "keyword spotting" stand-in: 16-dimensional feature frames, an MLP encoder that is pretrained on
one set of keywords, and a new classifier head fine-tuned on another set.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

FEATURES = 16
HIDDEN = 64


class Encoder(nn.Module):
    """The part whose parameters are pretrained."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class KeywordClassifier(L.LightningModule):
    """Encoder + a linear head for `num_classes` keywords."""

    def __init__(self, num_classes: int = 4, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = Encoder()
        self.head = nn.Linear(HIDDEN, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr, momentum=0.9)


def keywords(num_classes: int, samples: int, seed: int, offset: int = 0) -> torch.utils.data.TensorDataset:
    """Returns synthetic frames: each class is a noisy non-linear pattern of a shared latent code.

    Classes ``offset .. offset + num_classes - 1`` draw on the same latent structure, so an encoder
    pretrained on some classes helps with others.
    """
    g = torch.Generator().manual_seed(1234)
    mixing = torch.randn(8, FEATURES, generator=g)  # the structure shared by every task
    centers = torch.randn(offset + num_classes, 8, generator=g)[offset:] * 2.0
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (samples,), generator=g)
    latent = centers[labels] + 0.8 * torch.randn(samples, 8, generator=g)
    frames = torch.tanh(latent @ mixing) + 0.1 * torch.randn(samples, FEATURES, generator=g)
    return torch.utils.data.TensorDataset(frames, labels)


def loader(dataset: torch.utils.data.Dataset, shuffle: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=shuffle)
