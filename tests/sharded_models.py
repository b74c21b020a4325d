"""A small model to shard (FSDP2, tensor parallel, both), its pretrained files in every format, and checks.

`Net` has four pretrained parts, each published in another format by `write_sources`, and a new
`head` that no file holds:

- ``encoder`` (Linear 8->8, ReLU, Linear 8->7): a Hugging Face sharded checkpoint (index + two
  safetensors shards); the part that tensor parallelism splits (column-wise, then row-wise);
- ``decoder`` (Linear 7->7): ``.safetensors``; 7 rows, so dim-0 shards over 2 or 4 ranks are uneven;
- ``proj`` (Linear 7->7): a Lightning checkpoint (``state_dict`` under ``proj.``, with optimizer state);
- ``norm`` (LayerNorm 7): a ``torch.save`` zip (``.ckpt``);
- ``head`` (Linear 7->1): not in any file; it counts the initialisations it gets on real memory.

Weights are fixed by a seed, so every process rebuilds the reference with `reference()`.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import torch

SEED = 2024
PARTS = ("encoder", "decoder", "proj", "norm")


class CountingLinear(torch.nn.Linear):
    """A Linear that counts how often it is initialised on real (not meta) memory."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if not self.weight.is_meta:
            self.real_inits = getattr(self, "real_inits", 0) + 1


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 7))
        self.decoder = torch.nn.Linear(7, 7)
        self.proj = torch.nn.Linear(7, 7)
        self.norm = torch.nn.LayerNorm(7)
        self.head = CountingLinear(7, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.proj(torch.relu(self.decoder(self.encoder(x))))))


def reference() -> Net:
    """Returns the pretrained network (on CPU, the same in every process); its norm is not the default."""
    torch.manual_seed(SEED)
    net = Net()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.5, 0.5)
    return net


def reference_state() -> dict[str, torch.Tensor]:
    """Returns the pretrained tensors under the Net's own names (head included, for shapes)."""
    return {k: v.detach().clone() for k, v in reference().state_dict().items()}


def write_sources(folder: pathlib.Path, *, decoder: torch.nn.Module | None = None) -> dict[str, str]:
    """Writes each pretrained part in its format under `folder`; returns key -> path for the Pretrainer.

    `decoder`: publish this module as the decoder instead (e.g. one of another shape).
    """
    import safetensors.torch

    folder.mkdir(parents=True, exist_ok=True)
    net = reference()
    encoder = {k: v.contiguous() for k, v in net.encoder.state_dict().items()}
    shards = {
        "model-00001-of-00002.safetensors": ["0.weight", "0.bias"],
        "model-00002-of-00002.safetensors": ["2.weight", "2.bias"],
    }
    for shard, names in shards.items():
        safetensors.torch.save_file({n: encoder[n] for n in names}, str(folder / shard))
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in encoder.values())},
        "weight_map": {n: s for s, ns in shards.items() for n in ns},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in (decoder or net.decoder).state_dict().items()},
        str(folder / "decoder.safetensors"),
    )
    lightning = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": {f"proj.{k}": v for k, v in net.proj.state_dict().items()},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(7, 7)}}, "param_groups": [{"lr": 0.1}]}],
    }
    torch.save(lightning, folder / "proj-pretraining.ckpt")
    torch.save(net.norm.state_dict(), folder / "norm.ckpt")
    return {
        "encoder": str(folder / "model.safetensors.index.json"),
        "decoder": str(folder / "decoder.safetensors"),
        "proj": str(folder / "proj-pretraining.ckpt"),
        "norm": str(folder / "norm.ckpt"),
    }


def shard(net: torch.nn.Module, dp_mesh: Any, tp_mesh: Any | None = None) -> torch.nn.Module:
    """Applies tensor parallelism to the encoder (when `tp_mesh` has more than one rank), then FSDP2 over `dp_mesh`."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if tp_mesh is not None and tp_mesh.size() > 1:
        parallelize_module(net.encoder, tp_mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    for part in (net.encoder, net.decoder, net.proj, net.norm, net.head):
        fully_shard(part, mesh=dp_mesh)
    fully_shard(net, mesh=dp_mesh)
    return net


def full_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Returns every tensor of a (possibly sharded) net as a full tensor (a collective on DTensors)."""
    out = {}
    for name, tensor in net.state_dict().items():
        out[name] = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return out


def check_loaded(net: torch.nn.Module) -> dict[str, Any]:
    """Returns what a test asserts after the load: which tensors equal the file, and the head's state."""
    want = reference_state()
    full = full_state(net)
    equal = {name: bool(torch.equal(full[name], want[name])) for name in want if not name.startswith("head.")}
    head = full["head.weight"]
    bound = 1 / math.sqrt(7)  # Linear.reset_parameters draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return {
        "equal": equal,
        "head_finite": bool(torch.isfinite(head).all() and torch.isfinite(full["head.bias"]).all()),
        "head_initialised": bool(head.abs().max() <= bound and head.abs().sum() > 0),
        "head_inits": getattr(net.head, "real_inits", 0),
        "placements": {
            name: str(getattr(tensor, "placements", "dense")) for name, tensor in net.state_dict(keep_vars=True).items()
        },
    }


def local_values(net: torch.nn.Module) -> dict[str, list]:
    """Returns this process's local values of every tensor (to prove nothing was copied)."""
    return {
        name: (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach().flatten().tolist()
        for name, tensor in net.state_dict(keep_vars=True).items()
    }
