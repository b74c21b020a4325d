"""What the Pretrainer streams to nodes that do not share its collection folder, and what they make of it.

The fetching rank sends every collected ``<key>.ckpt`` (and a sharded checkpoint's
``<key>.shards/`` files); the first rank of each other node places them in its own collection
folder as copies, each checked against the sender's sha256 and recorded like any fetched file
(`pl_pretrain.fetching.arrival`). The bytes travel through `pl_pretrain.stream`, which knows
nothing of keys or records: here is where those meanings stay.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

from pl_pretrain._constants import PARAMFILE_EXT
from pl_pretrain.errors import FetchError, PretrainerError
from pl_pretrain.fetching import Fetched
from pl_pretrain.fetching.arrival import Arrival, holds, recorded
from pl_pretrain.stream import Sink
from pl_pretrain.transfer import shard_names

__all__ = ["CollectedFiles"]


@dataclasses.dataclass(frozen=True)
class _Label:
    """One file of the stream: its loadable, where it goes inside the collection folder, and what it is."""

    key: str
    folder: str | None  # None: the collection folder itself; else a subfolder (a sharded checkpoint's shards)
    name: str
    like: Fetched


class CollectedFiles:
    """The collected files of one `Pretrainer.collect_files`, as a stream to other nodes.

    Args:
        collect_in: the collection folder (the same path on every node, a different disk).
        shard_folder: key -> the name of the folder, inside `collect_in`, holding its shards.
        files_of: the collection -> its key -> `Fetched` mapping.
        with_files: (the collection, this node's mapping) -> the collection to use on this node.
    """

    def __init__(
        self,
        collect_in: pathlib.Path,
        shard_folder: Callable[[str], str],
        files_of: Callable[[Any], dict[str, Fetched]],
        with_files: Callable[[Any, dict[str, Fetched]], Any],
    ) -> None:
        self.collect_in = collect_in.expanduser().absolute()
        self.shard_folder = shard_folder
        self.files_of = files_of
        self.with_files = with_files

    def outgoing(self, collection: Any) -> list[tuple[_Label, pathlib.Path]]:
        """Returns (label, path to read) of every file to send, on the fetching rank."""
        items = []
        for key, fetched in self.files_of(collection).items():
            # Under NO_LINK the fetcher's path is the source's own; a receiving node still places <key>.ckpt.
            items.append((_Label(key, None, key + PARAMFILE_EXT, fetched), fetched.path))
            for name in shard_names(fetched.path) or ():
                folder = self.shard_folder(key)
                path = self.collect_in / folder / name
                if not path.is_file():
                    raise FetchError(
                        f"The shard '{path}' of '{fetched.path}' is not in the collection folder, so it cannot be "
                        "streamed to the other nodes.",
                        key=key,
                        source=fetched.source,
                        hint="Use a LocalStrategy other than NO_LINK for sharded checkpoints on nodes without a shared disk.",
                    )
                like = recorded(path.parent, name) or dataclasses.replace(
                    fetched, path=path, filename=name, location=str(path), sha256=None, size=path.stat().st_size
                )
                items.append((_Label(key, folder, name, like), path))
        return items

    def receiver(self, collection: Any) -> _Receiver:
        """Returns what a receiving node's first rank writes the stream into."""
        return _Receiver(self.collect_in)

    def received(self, collection: Any) -> Any:
        """Returns the collection every rank of a receiving node loads from, once the stream succeeded."""
        files = {
            key: dataclasses.replace(fetched, path=self.collect_in / (key + PARAMFILE_EXT), reused=False)
            for key, fetched in self.files_of(collection).items()
        }
        return self.with_files(collection, files)


class _Receiver:
    def __init__(self, collect_in: pathlib.Path) -> None:
        self.collect_in = collect_in

    def _folder(self, label: _Label) -> pathlib.Path:
        return self.collect_in if label.folder is None else self.collect_in / label.folder

    def wants(self, label: Any, size: int) -> bool:
        return not holds(self._folder(label), label.name, dataclasses.replace(label.like, size=size))

    def open(self, label: Any, size: int) -> Sink:
        try:
            return _Placed(Arrival(self._folder(label), label.name, label.like, size), label.key)
        except PretrainerError as error:
            error.with_context(key=label.key, source=label.like.source)
            raise


class _Placed:
    """An `Arrival` whose errors name the loadable."""

    def __init__(self, arrival: Arrival, key: str) -> None:
        self.arrival, self.key = arrival, key

    def write(self, data: memoryview) -> None:
        self._named(self.arrival.write, data)

    def commit(self, sha256: str) -> None:
        self._named(self.arrival.commit, sha256)

    def discard(self) -> None:
        self.arrival.discard()

    def _named(self, step: Callable[[Any], Any], arg: Any) -> None:
        try:
            step(arg)
        except PretrainerError as error:
            error.with_context(key=self.key, source=self.arrival.like.source)
            raise
