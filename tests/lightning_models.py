"""LightningModules for the callback tests (module level: ddp_spawn pickles them).

Each module records, on every rank, a fingerprint of its weights when training (or testing)
starts, before the first step, into ``$PL_PRETRAIN_RECORD_DIR/<tag>-rank<r>.json``.
"""

from __future__ import annotations

import json
import os

import lightning as L
import torch
from helpers import digest
from sharded_models import CountingLinear


def encoder(seed: int | None = None) -> torch.nn.Module:
    if seed is not None:
        torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))


class _Recording(L.LightningModule):
    def __init__(self, tag: str = "run") -> None:
        super().__init__()
        self.tag = tag
        self.records: dict[str, dict] = {}

    def _record(self, event: str) -> None:
        entry = {
            "rank": self.global_rank,
            "encoder": digest(self.encoder) if hasattr(self, "encoder") else None,
            "head": digest(self.head) if hasattr(self, "head") else None,
            "head_finite": bool(torch.isfinite(self.head.weight).all()) if hasattr(self, "head") else None,
            "head_inits": getattr(getattr(self, "head", None), "real_inits", None),
            "encoder_requires_grad": [p.requires_grad for p in self.encoder.parameters()]
            if hasattr(self, "encoder")
            else None,
            "world_size": self.trainer.world_size,
        }
        self.records[event] = entry
        folder = os.environ.get("PL_PRETRAIN_RECORD_DIR")
        if folder:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{self.tag}-{event}-rank{self.global_rank}.json"), "w") as f:
                json.dump(entry, f)

    def on_train_start(self) -> None:
        self._record("train_start")

    def on_train_end(self) -> None:
        self._record("train_end")

    def on_test_start(self) -> None:
        self._record("test_start")

    def forward(self, x):
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    def _data(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 8, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)

    def train_dataloader(self):
        return self._data()

    def test_dataloader(self):
        return self._data()


class Model(_Recording):
    """An encoder (the pretrained part) and a head, built in __init__."""

    def __init__(self, tag: str = "run", seed: int = 123) -> None:
        super().__init__(tag)
        torch.manual_seed(seed)
        self.encoder = encoder()
        self.head = torch.nn.Linear(8, 1)


class Nested(_Recording):
    """The pretrained part sits deeper: model.backbone."""

    def __init__(self, tag: str = "run") -> None:
        super().__init__(tag)
        self.model = torch.nn.Module()
        self.model.backbone = encoder(seed=5)
        self.encoder = self.model.backbone
        self.head = torch.nn.Linear(8, 1)


class LateModel(_Recording):
    """Builds its layers in configure_model (they do not exist in setup)."""

    def __init__(self, tag: str = "run") -> None:
        super().__init__(tag)

    def configure_model(self) -> None:
        if hasattr(self, "encoder"):
            return
        torch.manual_seed(321)
        self.encoder = encoder()
        self.head = torch.nn.Linear(8, 1)


class MetaModel(_Recording):
    """Builds its layers on the meta device in configure_model (nothing allocated until materialised)."""

    def __init__(self, tag: str = "run") -> None:
        super().__init__(tag)

    def configure_model(self) -> None:
        if hasattr(self, "encoder"):
            return
        with torch.device("meta"):
            self.encoder = encoder()
            self.head = CountingLinear(8, 1)  # not in the pretrained file


class Scale(torch.nn.Module):
    """A module with a parameter and no reset_parameters(): nothing can initialise it after meta."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(8))


class MetaModelWithScale(MetaModel):
    def configure_model(self) -> None:
        if hasattr(self, "encoder"):
            return
        super().configure_model()
        with torch.device("meta"):
            self.scale = Scale()
