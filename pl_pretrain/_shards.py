"""Shards under a pinned index: their sha256s, recorded at the first collection and verified ever after.

A pin (``checksums={key: "sha256:..."}``) names the index file of a sharded checkpoint, and a
Hugging Face index lists its shards by name only: without this the pin would vouch for the
index and for none of the weights. The fetching process records each shard's digest beside the
shards (``<collect_in>/<key>.shards/.pl_pretrain/.index-sha256.json``, as the folder's records) for the pinned index, and
every later collection and every load compares the shards with that record.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Mapping

from pl_pretrain.errors import ChecksumError
from pl_pretrain.fetching import Fetched, file_sha256, verify_sha256

# Written and read as the folder's own records are (whole, fsynced), under a name no shard's record has.
from pl_pretrain.fetching.records import _read_record, _write_record

__all__ = ["pin_shards", "check_pinned_shards", "recorded_shards"]

_MANIFEST = ".index-sha256"  # a dot name: never the record of a shard, whose names are plain


def recorded_shards(folder: pathlib.Path | None, index_sha256: str) -> dict[str, str] | None:
    """Returns shard name -> sha256 recorded in `folder` for the index with this digest, or None."""
    manifest = None if folder is None else _read_record(folder, _MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("index_sha256") != index_sha256:
        return None  # recorded for another index (the pin changed): recorded again
    shards = manifest.get("shards")
    return {str(k): str(v) for k, v in shards.items()} if isinstance(shards, dict) else None


def pin_shards(index_sha256: str, shards: Mapping[str, Fetched], folder: pathlib.Path | None) -> dict[str, str]:
    """Returns shard name -> sha256 once each shard matches what was recorded for this index; records them the first time.

    Raises:
        ChecksumError: a shard differs from the digest recorded when the pinned index was first
            collected; the bad copy is removed (never a user's own source file).
    """
    recorded = recorded_shards(folder, index_sha256) or {}
    digests: dict[str, str] = {}
    for name, fetched in shards.items():
        if name in recorded:
            try:
                fetched = verify_sha256(fetched, recorded[name])
            except ChecksumError as error:
                raise ChecksumError(
                    f"Shard '{name}' of the pinned index is not the one recorded when the index was first "
                    f"collected: {error.message}",
                    source=fetched.source,
                    hint="The source changed under the same index: fetch again with FetchConfig(overwrite=True) "
                    "if the new shards are meant, or restore the old ones.",
                ) from None
        digests[name] = fetched.sha256 if fetched.sha256 and not fetched.reused else file_sha256(fetched.path)
    if folder is not None and digests != recorded:
        # A read-only store (compute nodes) cannot record: its record, when there is one, was checked above.
        with contextlib.suppress(OSError):
            _write_record(folder, _MANIFEST, {"index_sha256": index_sha256, "shards": digests})
    return digests


def check_pinned_shards(recorded: Mapping[str, str], paths: Mapping[str, pathlib.Path]) -> None:
    """Raises `ChecksumError` when a shard about to be loaded is not the one recorded with its pinned index."""
    for name, path in paths.items():
        expected = recorded.get(name)
        if expected is None:
            continue
        actual = file_sha256(path)
        if actual != expected:
            raise ChecksumError(
                f"Shard '{path}' changed after it was collected: it has sha256 {actual}, but sha256 {expected} "
                "was recorded with the pinned index; nothing was loaded.",
                hint="Collect the checkpoint again (FetchConfig(overwrite=True)).",
            )
