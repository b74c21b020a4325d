"""The interface of one source kind: what `fetch_file` asks of the local folder, the web, the Hub and any kind added later.

`fetch_file` checks the arguments, picks the kind (``fetch._KINDS``: the first kind whose
`fetch_from` matches and that `handles` the source), and asks it, in this order:

1. `check` the request before anything is written;
2. `unplaced`: the file where it already lives (the source folder, the Hub cache), when no
   destination is wanted (no `savedir`, or ``NO_LINK``);
3. `placed`: with the destination's lock held, bring the file into ``savedir/save_filename``,
   recording its identity (`records`) and writing only whole files (`placement`); or, when that
   folder is read-only, `reusable` alone: the file its record vouches for, or nothing.

A new kind is one module with one `SourceKind` subclass, plus one line in ``fetch._KINDS``.
See docs/architecture.md.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import ClassVar

from pl_pretrain.fetching.network import ProgressGroup
from pl_pretrain.fetching.sources import FetchConfig, Fetched, FetchFrom, LocalStrategy


@dataclass(frozen=True)
class Request:
    """One file to fetch, with the arguments already checked.

    Attributes:
        source: the source as given (a URL may hold credentials: show only `SourceKind.shown`).
        filename: the file's relative path inside the source.
        savedir: the destination folder (absolute), or None when the file stays where it lives.
        save_filename: the file's name inside `savedir`.
        strategy: how the file is placed in `savedir`.
        config: how to fetch.
        progress: a progress bar shared with files fetched at once (None: each file shows its own).
    """

    source: str
    filename: str
    savedir: pathlib.Path | None
    save_filename: str
    strategy: LocalStrategy
    config: FetchConfig
    progress: ProgressGroup | None = None

    @property
    def destination(self) -> pathlib.Path:
        """Returns ``savedir/save_filename``; only for a request that has a `savedir`."""
        if self.savedir is None:
            raise AssertionError("a request without savedir has no destination")
        return self.savedir / self.save_filename


class SourceKind:
    """One kind of source; subclasses override `placed`, and the other methods where their kind differs."""

    fetch_from: ClassVar[FetchFrom]

    def handles(self, source: str) -> bool:
        """Returns True when this kind reads `source` (a kind may take only some URL schemes)."""
        return True

    def shown(self, source: str) -> str:
        """Returns `source` fit for messages and records (no credentials)."""
        return source

    def default_name(self, filename: str) -> str:
        """Returns the name a file gets in `savedir` when no `save_filename` is given."""
        return filename.rsplit("/", 1)[-1]

    def default_savedir(self, source: str, filename: str) -> pathlib.Path | None:
        """Returns where the file is placed when no `savedir` is given; None: it stays where it lives."""
        return None

    def check(self, request: Request) -> None:
        """Raises when the request cannot succeed, before anything is written."""

    def unplaced(self, request: Request) -> Fetched | None:
        """Returns the file where it already lives, or None when this kind has no such place."""
        return None

    def reusable(self, request: Request) -> Fetched | None:
        """Returns the file already at `request.destination` when its record vouches for it, else None.

        Called by `placed` first, and alone (without a lock) when the destination's folder is read-only.
        """
        return None

    def placed(self, request: Request) -> Fetched:
        """Returns the file placed at `request.destination`; called with that destination's lock held."""
        raise NotImplementedError
