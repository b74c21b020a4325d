"""What each rank runs in the sharded-model tests without Lightning (module level, so spawn can import it).

Each job shards tests/sharded_models.py's `Net` with FSDP2 over every rank of the gloo group the
harness (tests/dist.py) made, then runs the Pretrainer's distributed protocol, and returns what
its rank saw. `Traffic` counts what goes through the process group meanwhile.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import torch
import torch.distributed as dist
from sharded_models import check_loaded, local_values, shard, write_sources
from torch.utils._python_dispatch import TorchDispatchMode

from pl_pretrain import Pretrainer, PretrainerError, TransferOptions

_OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")


class Traffic(TorchDispatchMode):
    """Counts the tensor bytes of every collective (c10d and functional) while active.

    Every process-group operation, whether called through ``torch.distributed`` or by DTensor's
    functional collectives, reaches the dispatcher as a ``c10d`` / ``_c10d_functional`` op, so a
    dispatch mode sees each one. Bytes moved by the object collectives (pl_pretrain's small
    exchanges of outcomes, pickled into byte tensors) are counted apart, in `object_bytes`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tensor_bytes = 0
        self.object_bytes = 0
        self.ops: list[str] = []
        self._in_object = 0
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> Traffic:
        for name in _OBJECT_COLLECTIVES:
            original = getattr(dist, name)
            self._saved[name] = original
            setattr(dist, name, self._tagging(original))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, original in self._saved.items():
            setattr(dist, name, original)

    def _tagging(self, original: Any) -> Any:
        @functools.wraps(original)
        def tagged(*args: Any, **kwargs: Any) -> Any:
            self._in_object += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._in_object -= 1

        return tagged

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func.namespace in ("c10d", "_c10d_functional"):
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            size = sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
            if self._in_object:
                self.object_bytes += size
            else:
                self.tensor_bytes += size
                self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _sharded_net(world_size: int, seed: int) -> torch.nn.Module:
    from sharded_models import Net
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(seed)  # every rank starts from other weights: only the load makes them agree
    return shard(Net(), init_device_mesh("cpu", (world_size,)))


def load_and_count(rank: int, folder: str, collect_in: str) -> dict[str, Any]:
    """Loads every part into an FSDP2 net; returns the checks, the reports and the process-group traffic."""
    net = _sharded_net(dist.get_world_size(), seed=100 + rank)
    paths = write_sources(pathlib.Path(folder) / f"src{rank}") if rank == 0 else None
    box = [paths]
    dist.broadcast_object_list(box, src=0)
    parts = {key: getattr(net, key) for key in box[0]}
    pretrainer = Pretrainer(collect_in, parts, paths=box[0])
    pretrainer.collect_files(internal_ddp_handling=True)
    with Traffic() as during_load:
        reports = pretrainer.load_collected()
    with Traffic() as control:  # the counter sees a tensor collective of known size
        dist.broadcast(torch.ones(1000), src=0)
    out = check_loaded(net)
    out["reports"] = {k: r.to_dict() for k, r in reports.items()}
    out["traffic"] = {"tensor_bytes": during_load.tensor_bytes, "object_bytes": during_load.object_bytes}
    out["ops"] = during_load.ops
    out["control_bytes"] = control.tensor_bytes
    return out


def load_refused(rank: int, folder: str, collect_in: str, case: str) -> dict[str, Any]:
    """Loads a decoder that cannot be loaded (`case`); returns the error and whether any local value changed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate

    net = _sharded_net(dist.get_world_size(), seed=200 + rank)
    options = TransferOptions()
    path = None
    if rank == 0:
        if case == "mismatch":
            torch.manual_seed(7)
            path = write_sources(pathlib.Path(folder), decoder=torch.nn.Linear(7, 5))["decoder"]
        elif case == "strict":
            import safetensors.torch

            path = str(pathlib.Path(folder) / "decoder-and-more.safetensors")
            tensors = {"weight": torch.ones(7, 7), "bias": torch.ones(7), "scale": torch.ones(1)}
            safetensors.torch.save_file(tensors, path)
        else:
            path = write_sources(pathlib.Path(folder))["decoder"]
    if case == "strict":
        options = TransferOptions(strict=True)
    if case == "dtype":
        options = TransferOptions(dtype="bfloat16")  # would re-allocate shards that FSDP owns
    if case == "partial":
        # A pending reduction holds no slice of a full tensor: no file can fill it.
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        weight = DTensor.from_local(torch.full((7, 7), float(rank)), mesh, [Partial()])
        net.decoder = torch.nn.Linear(7, 7)
        net.decoder.weight = torch.nn.Parameter(weight)
        net.decoder.bias = torch.nn.Parameter(DTensor.from_local(torch.zeros(7), mesh, [Replicate()]))
    box = [path]
    dist.broadcast_object_list(box, src=0)
    before = local_values(net.decoder)
    pretrainer = Pretrainer(
        collect_in, {"decoder": net.decoder}, paths={"decoder": box[0]}, transfer_options={"decoder": options}
    )
    pretrainer.collect_files(internal_ddp_handling=True)
    error: dict[str, Any] = {}
    try:
        pretrainer.load_collected()
    except PretrainerError as failed:
        error = {"type": type(failed).__name__, "text": str(failed), "key": failed.key}
    return {"error": error, "unchanged": local_values(net.decoder) == before}
