"""The plan/check/apply engine: `torch_parameter_transfer` and its dry runs, `plan_transfer` and `diagnose_transfer`.

A transfer is planned first (the file read through a memory map, keys mapped and matched), then
checked (shapes, strictness, meta tensors, sharded targets), and only then applied, one tensor
copy at a time: a transfer that fails leaves the module as it was. Planning and applying stay
separate so that the dry runs are the real transfer's own code.

Sharded targets (``DTensor`` parameters and buffers: FSDP2, tensor parallel) are planned and
checked on their global shapes, so every process of a job reaches the same verdict and the same
report; each then copies only the part of each tensor it holds (`dtensor.local_part`) from the
memory-mapped file into its local tensor.
"""

from __future__ import annotations

import itertools
import pathlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from pl_pretrain.errors import ConfigurationError, TransferError
from pl_pretrain.transfer.dtensor import LocalPart, is_dtensor, local_part
from pl_pretrain.transfer.keys import _legacy_renames, _rename, _selected, _unmatched_patterns
from pl_pretrain.transfer.options import PathLike, TransferOptions
from pl_pretrain.transfer.readers import read_state_dict
from pl_pretrain.transfer.report import TransferReport, _few

__all__ = ["torch_parameter_transfer", "plan_transfer", "diagnose_transfer"]


def torch_parameter_transfer(
    obj: torch.nn.Module,
    path: PathLike,
    options: TransferOptions | Mapping[str, Any] | None = None,
    *,
    shard_dir: PathLike | None = None,
) -> TransferReport:
    """Returns the report of copying the checkpoint at `path` into `obj`'s parameters and buffers.

    The file is read through a memory map and each tensor is copied once, in place, into the
    target (converting to the target's dtype and device on the way), so the transfer adds almost
    no private memory. Names are mapped and filtered by `options` (see `TransferOptions`). Every
    check (shapes, strictness, ambiguous names) runs before the first copy: a transfer that fails
    leaves `obj` as it was. The report says what did not load; the Pretrainer logs it once per job.
    `plan_transfer` gives the same report without copying anything.

    Args:
        shard_dir: for a sharded checkpoint's index, the folder its shards were collected into
            (see `read_state_dict`); ``None``: beside the index, then beside its real location.

    Raises:
        TransferError: the file cannot be read, a key asked for has another shape (unless
            ``on_mismatch="skip"``), or ``strict=True`` and anything is missing, unexpected or
            mismatched. `UnsafeCheckpointError` when the file needs arbitrary code to unpickle.
        ConfigurationError: the options are invalid, or `key_map` sends two file keys to one target key.
    """
    options = TransferOptions.coerce(options)
    path = pathlib.Path(path)
    plan = _plan(obj, path, options, shard_dir)
    _check(obj, path, plan.report, options, plan.filled)
    plan.parts = _local_parts(obj, plan, options)
    return _apply(obj, plan, options)


def plan_transfer(
    obj: torch.nn.Module,
    path: PathLike,
    options: TransferOptions | Mapping[str, Any] | None = None,
    *,
    shard_dir: PathLike | None = None,
) -> TransferReport:
    """Returns the report `torch_parameter_transfer` would give, copying nothing (a dry run).

    The file is read (through a memory map: shapes and dtypes, not the tensors' bytes), the keys
    are mapped and matched and every check runs exactly as in the real transfer; `loaded` and
    `bytes` say what would be copied. `obj` is not changed.

    Args:
        shard_dir: for a sharded checkpoint's index, the folder its shards were collected into
            (see `read_state_dict`); ``None``: beside the index, then beside its real location.

    Raises:
        TransferError, ConfigurationError: whatever `torch_parameter_transfer` would raise.
    """
    report, error = diagnose_transfer(obj, path, options, shard_dir=shard_dir)
    if error is not None:
        raise error
    return report


def diagnose_transfer(
    obj: torch.nn.Module,
    path: PathLike,
    options: TransferOptions | Mapping[str, Any] | None = None,
    *,
    shapes_only: bool = False,
    shard_dir: PathLike | None = None,
) -> tuple[TransferReport, TransferError | None]:
    """Returns (the report of a dry run, the error the real transfer would raise or None); copies nothing.

    Unlike `plan_transfer`, a failing check (a shape mismatch under ``on_mismatch="error"``,
    ``strict=True``) does not hide the report: it comes back with every key sorted, and the
    error beside it. `loaded` then lists the keys that match, although a real transfer would
    copy none of them. The error is the one the transfer raises, word for word.

    Args:
        shapes_only: `obj` was built only for its shapes (on the ``meta`` device, by a dry-run
            tool): its meta tensors are not counted as a failure.
        shard_dir: for a sharded checkpoint's index, the folder its shards were collected into
            (see `read_state_dict`); ``None``: beside the index, then beside its real location.

    Raises:
        TransferError, ConfigurationError: the file cannot be read, or the keys cannot be mapped
            (these come before any report exists).
    """
    options = TransferOptions.coerce(options)
    path = pathlib.Path(path)
    plan = _plan(obj, path, options, shard_dir)
    plan.source = {}  # only names and shapes are needed from here on: release the file mappings
    report = plan.report
    error = None
    try:
        # Before `loaded` is filled, as in the real transfer, so that the messages are the same.
        _check(obj, path, report, options, plan.filled, meta=not shapes_only)
    except TransferError as failed:
        error = failed
    parts = _local_parts(obj, plan, options)
    for name, _ in plan.pairs:
        tensor = plan.target[name]
        itemsize = _dtype_for(tensor, options).itemsize  # what `_apply` counts once the tensor is placed
        report.loaded.append(name)
        report.bytes += tensor.numel() * itemsize
        report.local_bytes += (parts[name].numel if name in parts else tensor.numel()) * itemsize
    report.loaded.extend(plan.tied)
    return report, error


@dataclass
class _Plan:
    """What a transfer will do, before any check or copy.

    Attributes:
        report: the report so far: missing, unexpected, mismatched, excluded, prefix (not `loaded`).
        source: the file's tensors (memory-mapped), by file key.
        target: the target's tensors, by target key.
        pairs: (target key, file key) for each tensor to copy.
        tied: target keys filled through a tied tensor listed in `pairs`.
        filled: ids of the target tensors the file will fill.
        parts: target key -> the part of the full tensor a sharded (DTensor) target holds
            here; filled once the checks have passed.
    """

    report: TransferReport
    source: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor]
    pairs: list[tuple[str, str]]
    tied: list[str]
    filled: set[int]
    parts: dict[str, LocalPart] = field(default_factory=dict)


def _plan(obj: torch.nn.Module, path: pathlib.Path, options: TransferOptions, shard_dir: PathLike | None) -> _Plan:
    """Returns what a transfer of `path` into `obj` would do: reads the file, maps and matches the keys."""
    source, fmt = read_state_dict(path, options, shard_dir=shard_dir)
    renamed = _legacy_renames(source)
    target = {name: t for name, t in obj.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}
    report = TransferReport(source=path, format=fmt, renamed=renamed)
    asked = [name for name in target if _selected(name, options)]
    report.excluded.extend(name for name in target if not _selected(name, options))
    renamed, left_out, report.prefix, mapped = _rename(source, asked, options, path)
    report.warnings.extend(
        f"TransferOptions({pattern}) matches no key of the file or the model"
        for pattern in _unmatched_patterns(options, [*target, *mapped])
    )
    shown = set(report.excluded)  # a file key and a target key often share a name: list it once
    report.excluded.extend(key for key in left_out if key not in shown)

    pairs: list[tuple[str, str]] = []
    for name in asked:
        key = renamed.get(name)
        if key is None:
            report.missing.append(name)
        elif tuple(source[key].shape) != tuple(target[name].shape):
            report.mismatched[name] = (tuple(source[key].shape), tuple(target[name].shape))
        else:
            pairs.append((name, key))
    # Tied weights (an embedding shared with an output layer): files often hold one name only
    # (safetensors refuses shared tensors), and filling that one fills the others.
    filled = {id(target[name]) for name, _ in pairs}
    tied = [name for name in report.missing if id(target[name]) in filled]
    report.missing = [name for name in report.missing if id(target[name]) not in filled]
    report.unexpected.extend(key for name, key in renamed.items() if name not in target)
    return _Plan(report, source, target, pairs, tied, filled)


def _apply(obj: torch.nn.Module, plan: _Plan, options: TransferOptions) -> TransferReport:
    """Returns the report after copying the planned tensors into `obj` (the checks have passed)."""
    report = plan.report
    with torch.no_grad():
        _place(obj, plan.filled, options)
        # Placement may have replaced buffers: copy into what the module holds now.
        target = obj.state_dict(keep_vars=True)
        for name, key in plan.pairs:
            tensor = target[name]
            part = plan.parts.get(name)
            if part is None:
                tensor.copy_(plan.source[key])
                report.local_bytes += tensor.numel() * tensor.element_size()
            else:
                # Only this part of the mapped file is read, straight into the local shard.
                local = tensor.to_local()
                local.copy_(part.read(plan.source[key]))
                report.local_bytes += local.numel() * local.element_size()
            report.loaded.append(name)
            report.bytes += tensor.numel() * tensor.element_size()  # a DTensor's numel() is the global one
    report.loaded.extend(plan.tied)
    plan.source = {}  # releases the file mappings now, not whenever the caller drops the plan
    return report


def _check(
    obj: torch.nn.Module,
    path: pathlib.Path,
    report: TransferReport,
    options: TransferOptions,
    loading: set[int],
    *,
    meta: bool = True,
) -> None:
    """Raises, before anything is copied, when the plan breaks the shape policy or strictness.

    `loading` holds the ids of the target tensors the file will fill. `meta`: also raise when
    tensors on the meta device would be left without values.
    """
    if report.mismatched and options.on_mismatch == "error":
        shapes = "; ".join(
            f"{k}: file {list(a)} vs model {list(b)}" for k, (a, b) in list(report.mismatched.items())[:10]
        )
        more = f" (and {len(report.mismatched) - 10} more)" if len(report.mismatched) > 10 else ""
        raise TransferError(
            f"'{path}' has other shapes than {type(obj).__name__} for {len(report.mismatched)} "
            f"key{'s' if len(report.mismatched) > 1 else ''}: {shapes}{more}. Nothing was loaded.",
            hint="To keep the model's values for them, exclude them (TransferOptions(exclude=[...])) "
            "or pass TransferOptions(on_mismatch='skip') to skip and report them.",
        )
    if options.strict and not report.complete:
        raise TransferError(
            f"Strict transfer from '{path}' into {type(obj).__name__} failed: {report.summary()}.{_details(report)} "
            "Nothing was loaded.",
            hint=report.hint() or "Map the keys (TransferOptions key_map / include / exclude) or drop strict=True.",
        )
    if options.strict and report.warnings:
        raise TransferError(
            f"Strict transfer from '{path}' into {type(obj).__name__} failed: {'; '.join(report.warnings)}. "
            "Nothing was loaded.",
            hint="Fix the pattern (glob patterns on the model's key names, `*` crosses dots), or drop strict=True.",
        )
    if not loading and not options.allow_empty and any(True for _ in _named_tensors(obj)):
        # Zero tensors into a module that has some is never what a fine-tuning job means, and
        # without this it ends with an INFO line and the model's random initialisation.
        why = "; ".join(report.warnings) or f"{report.summary()}.{_details(report)}"
        raise TransferError(
            f"Transferring '{path}' into {type(obj).__name__} would load no tensor at all: {why}",
            hint=report.hint()
            or "Map the file's keys onto the model's (TransferOptions key_map / include / exclude; "
            "`pl-pretrain plan` shows both sides), or pass TransferOptions(allow_empty=True) if loading nothing is meant.",
        )
    on_meta = [
        name
        for name, tensor in _named_tensors(obj)
        if meta and tensor.is_meta and (options.device is None or id(tensor) not in loading)
    ]
    if on_meta:
        # A non-persistent buffer (rotary frequencies, masks) is in no state dict, so no file can
        # fill it: the hint for the others would send the user looking for a file that cannot exist.
        saved = set(obj.state_dict(keep_vars=True))
        unsaved = [name for name in on_meta if name not in saved]
        hint = "Give TransferOptions(device='cpu') (or another device) and a file that holds every such key."
        if unsaved:
            hint = (
                f"{_few(unsaved, 5)} {'are non-persistent buffers' if len(unsaved) > 1 else 'is a non-persistent buffer'} "
                "(register_buffer(..., persistent=False)), which no checkpoint holds: give the module memory and "
                "compute them before the transfer (module.to_empty(device='cpu'), then its own initialisation, "
                "e.g. reset_parameters()), or create them off the meta device."
                + (" For the others, " + hint[0].lower() + hint[1:] if len(unsaved) < len(on_meta) else "")
            )
        raise TransferError(
            f"{type(obj).__name__} has tensors on the meta device that this transfer would leave without "
            f"values: {_few(on_meta, 5)}.",
            hint=hint,
        )


def _local_parts(obj: torch.nn.Module, plan: _Plan, options: TransferOptions) -> dict[str, LocalPart]:
    """Returns target key -> local part for every sharded target the plan fills; raises before any copy.

    Raises:
        ConfigurationError: a placement no part of a file can fill (``Partial``), or ``dtype`` /
            ``device`` options that would re-allocate a sharded tensor (its shards belong to FSDP
            or tensor parallelism, which must set them).
    """
    parts: dict[str, LocalPart] = {}
    for name, tensor in _named_tensors(obj):
        if not is_dtensor(tensor):
            continue
        dtype = _dtype_for(tensor, options)
        device = options.device if options.device is not None else tensor.device
        if dtype != tensor.dtype or device != tensor.device:
            raise ConfigurationError(
                f"TransferOptions(dtype={options.dtype!r}, device={options.device!r}) would re-allocate "
                f"'{name}' of {type(obj).__name__}, which is sharded (a DTensor on {tensor.device}, "
                f"{tensor.dtype}). Nothing was loaded.",
                hint="Give the model its dtype and device before sharding it (model.to(...) before "
                "fully_shard / parallelize_module, or FSDP2's MixedPrecisionPolicy), and drop these options.",
            )
    for name, _ in plan.pairs:
        tensor = plan.target[name]
        if is_dtensor(tensor):
            parts[name] = local_part(name, tensor)
    return parts


def _details(report: TransferReport) -> str:
    parts = []
    if report.missing:
        parts.append(f"missing (kept their values): {_few(report.missing)}")
    if report.unexpected:
        parts.append(f"unexpected (not read): {_few(report.unexpected)}")
    if report.mismatched:
        parts.append(
            "mismatched (file vs model): "
            + _few([f"{k} {list(a)} vs {list(b)}" for k, (a, b) in report.mismatched.items()])
        )
    return "".join(f" {part}." for part in parts)


def _named_tensors(obj: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """Yields (state-dict style name, tensor) for every parameter and buffer, persistent or not, tied ones under each name."""
    return itertools.chain(obj.named_parameters(remove_duplicate=False), obj.named_buffers(remove_duplicate=False))


def _place(obj: torch.nn.Module, loading: set[int], options: TransferOptions) -> None:
    """Moves `obj`'s tensors to ``options.dtype`` / ``options.device``; those about to be loaded are only allocated.

    `loading` holds the ids of the tensors the file will fill.

    A tensor about to be filled from the file is never converted first (that would be a second
    full copy): it is replaced by an empty one that the copy then fills, one tensor at a time.
    """
    if options.dtype is None and options.device is None:
        return
    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(old) -> (old, new), for tied tensors
    for module in obj.modules():
        # The slots themselves, not named_parameters(): a buffer, or a meta Parameter, is replaced
        # by a new tensor, which only assigning into the module's own dict does (typed loosely:
        # a slot of _parameters takes a Parameter, one of _buffers any tensor).
        both: tuple[dict[str, Any], ...] = (module._parameters, module._buffers)
        for slots in both:
            for leaf, tensor in slots.items():
                if tensor is None:
                    continue
                if id(tensor) in replaced:
                    slots[leaf] = replaced[id(tensor)][1]
                    continue
                dtype = _dtype_for(tensor, options)
                device = options.device if options.device is not None else tensor.device
                if tensor.dtype == dtype and tensor.device == device:
                    continue  # includes a tied parameter already placed under another name
                new = (
                    torch.empty(tensor.shape, dtype=dtype, device=device)
                    if id(tensor) in loading
                    else tensor.detach().to(dtype=dtype, device=device)
                )
                if isinstance(tensor, torch.nn.Parameter) and not tensor.is_meta:
                    tensor.data = new  # same Parameter object: optimizers and ties still see it
                    continue
                if isinstance(tensor, torch.nn.Parameter):
                    # A meta tensor cannot take real data in place; a new Parameter replaces it.
                    new = torch.nn.Parameter(new, requires_grad=tensor.requires_grad)
                replaced[id(tensor)] = (tensor, new)
                slots[leaf] = new


def _dtype_for(tensor: torch.Tensor, options: TransferOptions) -> torch.dtype:
    """Returns the dtype `tensor` has once placed: ``options.dtype`` for floating-point tensors, else its own."""
    if options.dtype is None or not tensor.is_floating_point():
        return tensor.dtype
    return cast(torch.dtype, options.dtype)  # TransferOptions made it a torch.dtype on creation
