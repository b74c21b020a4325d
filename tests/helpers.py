"""Small models and checkpoint files for the tests."""

from __future__ import annotations

import io
import pathlib
import socket

import torch


class Encoder(torch.nn.Module):
    def __init__(self, dim: int = 8, seed: int | None = None) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)


def module(seed: int, dim: int = 8) -> torch.nn.Module:
    """Returns a small module with weights fixed by `seed`."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, 4))


def ckpt_bytes(mod: torch.nn.Module) -> bytes:
    """Returns `mod.state_dict()` saved by torch.save, as bytes."""
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    return buf.getvalue()


def save(mod: torch.nn.Module, path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(mod.state_dict(), path)
    return path


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when both modules hold identical tensors under the same names."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def digest(mod: torch.nn.Module) -> str:
    """Returns a short fingerprint of a module's tensors (to compare across processes)."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(mod.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that nothing listens on now (for a store, a server or MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
