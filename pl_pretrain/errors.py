"""The errors pl_pretrain raises on purpose.

Every one of them is a `PretrainerError`. Each also subclasses the builtin a caller would already
catch: fetch failures are `ValueError`s (SpeechBrain code catches those), load failures are
`RuntimeError`s (as `torch.nn.Module.load_state_dict` raises).

An error carries the loadable `key`, the `source` it came from and the `rank` it happened on, so
the message raised on every rank of a job says what failed, where, and what to change.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "PretrainerError",
    "ConfigurationError",
    "ArgumentTypeError",
    "FetchError",
    "OfflineError",
    "ChecksumError",
    "TransferError",
    "UnsafeCheckpointError",
    "RemoteError",
]


class PretrainerError(Exception):
    """Base of every error pl_pretrain raises on purpose.

    Args:
        message: what went wrong, as a sentence.
        key: the loadable key concerned, when there is one.
        source: where the file was looked for (a folder, a URL, a hub repo id), never a token.
        rank: the global rank on which the failure happened, when known.
        hint: what the user should change.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        source: str | None = None,
        rank: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.key = key
        self.source = source
        self.rank = rank
        self.hint = hint

    def with_context(
        self, *, key: str | None = None, source: str | None = None, rank: int | None = None
    ) -> PretrainerError:
        """Returns this error with the fields that were still unknown filled in."""
        if self.key is None and key is not None:
            self.key = key
        if self.source is None and source is not None:
            self.source = str(source)
        if self.rank is None and rank is not None:
            self.rank = rank
        return self

    def __str__(self) -> str:
        where = []
        if self.key is not None:
            where.append(f"loadable '{self.key}'")
        if self.source is not None:
            where.append(f"source '{self.source}'")
        if self.rank is not None:
            where.append(f"rank {self.rank}")
        text = f"[{', '.join(where)}] {self.message}" if where else self.message
        if self.hint:
            text = f"{text} {self.hint}"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword fields do not survive Exception's default pickling (it replays `args` only);
        # errors cross process boundaries in the multi-process tests and the distributed protocol.
        return (_rebuild, (type(self), self.message, self.key, self.source, self.rank, self.hint))

    def to_record(self) -> dict[str, Any]:
        """Returns a plain dict that rebuilds this error on another rank (see `error_from_record`)."""
        return {
            "type": type(self).__name__,
            "message": self.message,
            "key": self.key,
            "source": self.source,
            "rank": self.rank,
            "hint": self.hint,
        }


def _rebuild(cls: type, message: str, key: Any, source: Any, rank: Any, hint: Any) -> PretrainerError:
    return cls(message, key=key, source=source, rank=rank, hint=hint)


class ConfigurationError(PretrainerError, ValueError):
    """The Pretrainer or the callback was set up in a way that cannot work (a fix in user code)."""


class ArgumentTypeError(ConfigurationError, TypeError):
    """An argument of the wrong type, or a decorated hook with the wrong signature: also a `TypeError`.

    SpeechBrain raises `TypeError` for both, and its users catch that; the `ValueError` of
    `ConfigurationError` is kept, so code catching either still catches this.
    """


class FetchError(PretrainerError, ValueError):
    """A file could not be brought from its source into the collection folder."""


class OfflineError(FetchError):
    """A file is needed from the network, but the network is off (`allow_network=False`, `HF_HUB_OFFLINE=1`)."""


class ChecksumError(FetchError):
    """A collected file does not have the digest the user pinned; the bad file has been removed."""


class TransferError(PretrainerError, RuntimeError):
    """A collected file could not be loaded into its object."""


class UnsafeCheckpointError(TransferError):
    """A checkpoint needs arbitrary pickle code to load, and the user did not allow it."""


class RemoteError(PretrainerError, RuntimeError):
    """Another rank failed with an exception that is not a `PretrainerError`; this carries its text."""


_BY_NAME: dict[str, type[PretrainerError]] = {
    cls.__name__: cls
    for cls in (
        PretrainerError,
        ConfigurationError,
        ArgumentTypeError,
        FetchError,
        OfflineError,
        ChecksumError,
        TransferError,
        UnsafeCheckpointError,
        RemoteError,
    )
}


# When several ranks fail, the error shown is the likeliest root cause: a wrong setting or a bad
# file explains the "No such file" or the lost contact that it caused on another rank, not the reverse.
_ROOT_CAUSE_ORDER = (
    "ConfigurationError",
    "ChecksumError",
    "UnsafeCheckpointError",
    "OfflineError",
    "FetchError",
    "TransferError",
    "RemoteError",
    "PretrainerError",
)


def root_cause_order(type_name: str) -> int:
    """Returns where an error of this type ranks as a root cause when several ranks fail (lower: first)."""
    try:
        return _ROOT_CAUSE_ORDER.index(type_name)
    except ValueError:
        return len(_ROOT_CAUSE_ORDER)


def error_from_record(record: dict[str, Any]) -> PretrainerError:
    """Returns the error described by `PretrainerError.to_record` (or a `RemoteError` for a foreign type)."""
    cls = _BY_NAME.get(record["type"], RemoteError)
    return cls(
        record["message"],
        key=record.get("key"),
        source=record.get("source"),
        rank=record.get("rank"),
        hint=record.get("hint"),
    )


def record_for(error: BaseException, *, rank: int, key: str | None = None) -> dict[str, Any]:
    """Returns the record to send to other ranks for any exception raised on `rank`."""
    if isinstance(error, PretrainerError):
        error.with_context(key=key, rank=rank)
        return error.to_record()
    return {
        "type": "RemoteError",
        "message": f"{type(error).__name__}: {error}",
        "key": key,
        "source": None,
        "rank": rank,
        "hint": None,
    }
