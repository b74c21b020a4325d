"""DTensor targets: which part of a full tensor in the file each sharded parameter holds here.

A parameter sharded by FSDP2 (``fully_shard``), tensor parallelism or both is a ``DTensor``: a
global shape, a device mesh and one placement per mesh dimension. Its local tensor holds, along
each tensor dimension, a set of the global indices. `local_part` computes that set from the
placements and this process's mesh coordinate, with public torch API only
(``DeviceMesh.get_coordinate``, ``Shard.local_shard_size_and_offset``), so that the transfer can
read exactly those elements from the memory-mapped file and copy them into ``to_local()``: no
full tensor is built and nothing goes over the process group.

Placements, applied left to right over the mesh dimensions as torch does:

- ``Replicate()``: the whole dimension;
- ``Shard(d)``: torch's chunking of what is left of dimension ``d`` (uneven last chunks, empty
  ones included);
- ``_StridedShard(d, split_factor)`` (FSDP2 over a tensor-parallel dimension, on a 2-D mesh):
  what is left is cut in ``split_factor`` pieces, each piece chunked, this coordinate's chunk of
  every piece kept;
- ``Partial`` (a pending reduction: no slice of a file holds it) and anything else raise a
  `ConfigurationError` naming the key and the placement, before anything is copied.

A dimension whose indices are one contiguous run is read as a slice (a view of the mapping);
otherwise with ``index_select``, which still reads only those indices.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from pl_pretrain.errors import ConfigurationError

__all__ = ["LocalPart", "is_dtensor", "local_part"]

Index = slice | torch.Tensor


def is_dtensor(tensor: Any) -> bool:
    """True when `tensor` is a ``torch.distributed.tensor.DTensor``."""
    # No DTensor can exist before its module is imported, and importing it costs seconds (sympy,
    # the op registry): a dense transfer must not pay that, so only look if someone already did.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


@dataclass(frozen=True)
class LocalPart:
    """The part of a full tensor that a DTensor holds locally.

    Attributes:
        index: per tensor dimension, a slice (a contiguous run) or a 1-D index tensor.
        shape: the local tensor's shape.
    """

    index: tuple[Index, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Returns the number of elements held locally."""
        n = 1
        for size in self.shape:
            n *= size
        return n

    def read(self, full: torch.Tensor) -> torch.Tensor:
        """Returns the local part of `full` (a view when every dimension is a slice)."""
        slices = tuple(i if isinstance(i, slice) else slice(None) for i in self.index)
        part = full[slices]
        for dim, i in enumerate(self.index):
            if isinstance(i, torch.Tensor):
                part = part.index_select(dim, i)
        return part


def local_part(key: str, tensor: Any) -> LocalPart:
    """Returns which part of the full tensor the DTensor `tensor` (target key `key`) holds here.

    Raises:
        ConfigurationError: a placement that no part of a full tensor can fill (``Partial``, an
            unknown kind), or a layout whose local shape is not the one computed (naming the key).
    """
    from torch.distributed.tensor import Replicate, Shard

    strided: Any = _strided_shard_type()
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    shape = tuple(tensor.shape)
    if coordinate is None:  # this process is not part of the tensor's mesh: it holds nothing
        return LocalPart(tuple(slice(0, 0) for _ in shape), tuple(0 for _ in shape))
    indices: list[torch.Tensor | range] = [range(size) for size in shape]
    placement: Any
    for mesh_dim, placement in enumerate(tensor.placements):
        chunks, here = mesh.size(mesh_dim), coordinate[mesh_dim]
        if isinstance(placement, Replicate):
            continue
        if strided is not None and isinstance(placement, strided):
            dim = placement.dim
            pieces = [_chunk(piece, chunks, here) for piece in _pieces(indices[dim], int(placement.split_factor))]
            indices[dim] = torch.cat([_tensor(piece) for piece in pieces])
        elif type(placement) is Shard:
            indices[placement.dim] = _chunk(indices[placement.dim], chunks, here)
        else:
            raise ConfigurationError(
                f"The target key '{key}' is a DTensor with the placement {placement!r} on mesh dimension "
                f"{mesh_dim} (placements {tuple(tensor.placements)}), which no part of a full tensor in a file "
                "can fill. Nothing was loaded.",
                hint="Load before the placement is introduced, or redistribute the parameter to Shard/Replicate "
                "placements first.",
            )
    part = LocalPart(tuple(_as_index(i) for i in indices), tuple(len(i) for i in indices))
    local_shape = tuple(tensor.to_local().shape)
    if part.shape != local_shape:
        # A layout torch chunks otherwise than documented (e.g. a future padding scheme): refuse
        # rather than copy the wrong elements.
        raise ConfigurationError(
            f"The target key '{key}' is a DTensor (placements {tuple(tensor.placements)}, global shape "
            f"{list(shape)}) whose local shape {list(local_shape)} is not the {list(part.shape)} pl_pretrain "
            "computes for it, so its local part cannot be read from the file. Nothing was loaded.",
            hint="Please report this layout; meanwhile load the weights before sharding the model.",
        )
    return part


def _strided_shard_type() -> type | None:
    # torch names it private; FSDP2 on a 2-D mesh uses it for parameters already sharded by TP.
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:
        return None
    return _StridedShard


def _chunk(indices: Any, chunks: int, here: int) -> Any:
    """Returns chunk `here` of `chunks` of `indices`, cut as ``torch.chunk`` (and DTensor's Shard) cut."""
    from torch.distributed.tensor import Shard

    size, offset = Shard.local_shard_size_and_offset(len(indices), chunks, here)
    return indices[int(offset) : int(offset) + int(size)]


def _pieces(indices: Any, split_factor: int) -> list[Any]:
    """Returns `indices` cut in `split_factor` pieces, as ``torch.chunk`` cuts (trailing ones may be empty)."""
    return [_chunk(indices, split_factor, piece) for piece in range(split_factor)]


def _tensor(indices: range | torch.Tensor) -> torch.Tensor:
    if isinstance(indices, range):
        return torch.arange(indices.start, indices.stop, indices.step, dtype=torch.long)
    return indices


def _as_index(indices: range | torch.Tensor) -> Index:
    """Returns a slice when `indices` is one contiguous increasing run, else a 1-D long tensor."""
    if isinstance(indices, range) and indices.step == 1:
        return slice(indices.start, indices.stop)
    values = _tensor(indices)
    if len(values) == 0:
        return slice(0, 0)
    start = int(values[0])
    if torch.equal(values, torch.arange(start, start + len(values))):
        return slice(start, start + len(values))
    return values
