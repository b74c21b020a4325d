"""`pl-pretrain fetch | inspect | plan`: the library's work, from a shell.

- ``fetch`` collects a job's files ahead of time (on a login node with network), by the same
  `Pretrainer.collect_files` a job runs, so that compute nodes can run offline.
- ``inspect`` says what a checkpoint file holds (format, keys, shapes, dtypes, sizes) by reading
  it through `transfer.read_state_dict`: a memory map, so memory does not grow with the file.
- ``plan`` is a dry run of a load: `transfer.diagnose_transfer` matches the checkpoint's keys
  against a model built on the meta device, with the mapping options applied, and says what would
  load, be missing, unexpected or mismatched, and whether a real load would succeed.

Every expected failure is one line on stderr, ``pl-pretrain: error: <message>``, and an exit code:
0 done; 1 the work failed (a fetch, an unreadable checkpoint, a load that would fail); 2 the
command line or a config file is wrong. Lightning and jsonargparse are imported only when a YAML
config or a LightningModule needs them, so ``inspect`` starts as fast as ``import torch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import importlib
import importlib.util
import json
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pl_pretrain.errors import ConfigurationError, PretrainerError
from pl_pretrain.fetching import FetchConfig, Fetched, LocalStrategy, file_sha256
from pl_pretrain.pretrainer import Pretrainer
from pl_pretrain.transfer import (
    TransferOptions,
    TransferReport,
    detect_format,
    diagnose_transfer,
    format_bytes,
    format_reports,
    read_state_dict,
    shard_names,
)

__all__ = ["main", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILED = 1
"""The work failed: a fetch, a checkpoint that cannot be read, a load that would fail."""
EXIT_USAGE = 2
"""The command line or a config file is wrong (argparse's own code for usage errors)."""

PROG = "pl-pretrain"

EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}  done (plan: a real load would succeed)
  {EXIT_FAILED}  the work failed: a fetch, a file that is not a readable checkpoint, a checksum
     (plan: a real load would fail)
  {EXIT_USAGE}  the command line or a config file is wrong
  Errors are one line on stderr: "{PROG}: error: <message>"."""


class UsageError(Exception):
    """The command line or a config file is wrong (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse prints the usage, then exits)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit code of ``pl-pretrain`` run with `argv` (default: the command line)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.command(args)
    except (UsageError, ConfigurationError) as error:
        return _fail(str(error), EXIT_USAGE)
    except PretrainerError as error:
        return _fail(str(error), EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:
        # The reader went away (`pl-pretrain inspect big.ckpt | head`): stop quietly, as shell tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser of ``pl-pretrain`` and its three commands."""
    from pl_pretrain import __version__

    parser = _Parser(
        prog=PROG,
        description="Pretrained parameters for PyTorch models in distributed jobs: collect files ahead of a "
        "job, look inside a checkpoint, dry-run a load.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_fetch(commands)
    _add_inspect(commands)
    _add_plan(commands)
    return parser


def _subparser(commands: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _pair(what: str, *, empty_key: bool = False, empty_value: bool = False):
    """Returns an argparse type that splits ``NAME=VALUE`` at the first ``=``."""

    def parse(text: str) -> tuple[str, str]:
        name, sep, value = text.partition("=")
        if not sep or (not name and not empty_key) or (not value and not empty_value):
            raise argparse.ArgumentTypeError(f"{text!r} is not of the form {what}")
        return name, value

    return parse


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=1, default=str))


def _shown_path(path: os.PathLike | str) -> str:
    """Returns `path` relative to the current folder when it lies inside it, else as it is."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _existing_file(text: str, what: str) -> pathlib.Path:
    path = pathlib.Path(text).expanduser()
    if not path.exists():
        raise UsageError(f"{what} '{text}' does not exist.")
    if not path.is_file():
        raise UsageError(f"{what} '{text}' is a folder, not a file.")
    return path


def _read_yaml(text: str) -> dict[str, Any]:
    """Returns a YAML config file as a dict; a missing or malformed file is a usage error."""
    import yaml

    path = _existing_file(text, "Config file")
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"Could not read the config file '{text}': {error}") from None
    except yaml.YAMLError as error:
        raise UsageError(f"'{text}' is not valid YAML: {error}") from None
    if not isinstance(config, dict):
        raise UsageError(f"'{text}' holds a {type(config).__name__}, not a LightningCLI config (a mapping).")
    return config


def _pretrainer_callbacks(config: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """Returns the init_args of every ``trainer.callbacks`` entry whose class_path ends in PretrainerCallback."""
    trainer = config.get("trainer")
    callbacks = trainer.get("callbacks") if isinstance(trainer, dict) else None
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    found = []
    for entry in callbacks or []:
        if isinstance(entry, dict) and str(entry.get("class_path", "")).rsplit(".", 1)[-1] == "PretrainerCallback":
            init_args = entry.get("init_args") or {}
            if not isinstance(init_args, dict):
                raise UsageError(
                    f"{where}: a PretrainerCallback's init_args is a {type(init_args).__name__}, not a mapping."
                )
            found.append(init_args)
    if not found:
        raise UsageError(
            f"{where} has no PretrainerCallback in trainer.callbacks "
            "(an entry with class_path: pl_pretrain.PretrainerCallback)."
        )
    return found


def _mapping(init_args: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    value = init_args.get(name) or {}
    if not isinstance(value, dict):
        raise UsageError(f"{where}: PretrainerCallback {name} is a {type(value).__name__}, not a mapping.")
    return dict(value)


# --------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------

FETCH_DESCRIPTION = """\
Collect a job's files ahead of time, on a machine with network (an HPC login node), into a
collection folder (each key as <KEY>.ckpt, as the job's Pretrainer places it) or only into the
Hugging Face cache, so that compute nodes can run offline. Files are fetched exactly as the job's
Pretrainer.collect_files fetches them: a job that collects into the same folder with the same
sources, strategy and revision reuses them without touching the network.

Sources are written as in `paths`: a local path, an http(s):// URL, or a Hub org/repo[/sub]/file.

examples:
  pl-pretrain fetch encoder=org/asr-model/encoder.ckpt lm=https://example.org/lm.ckpt --collect-in pretrained
  pl-pretrain fetch --default-source /data/pretrained --key encoder --key decoder
  pl-pretrain fetch --config job.yaml          # every PretrainerCallback of a LightningCLI config
  pl-pretrain fetch encoder=org/asr/encoder.ckpt --collect-in none   # the Hub cache only

Then, on the compute nodes: HF_HUB_OFFLINE=1, or FetchConfig(allow_network=False)
(YAML: fetch_config: {allow_network: false}); a file that was not collected fails at once."""


def _add_fetch(commands: Any) -> None:
    p = _subparser(
        commands,
        "fetch",
        "collect a job's files ahead of time (login node -> offline compute nodes)",
        FETCH_DESCRIPTION,
    )
    p.add_argument(
        "specs",
        nargs="*",
        metavar="KEY=SOURCE/FILE",
        type=_pair("KEY=SOURCE/FILE"),
        help="a loadable key and where its file comes from, as in `paths`",
    )
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="a LightningCLI config: fetch for every PretrainerCallback in trainer.callbacks (its "
        "collect_in, paths, default_source, checksums, local_strategy and fetch_config; "
        "allow_network is ignored: this is the machine with network)",
    )
    p.add_argument("--default-source", metavar="SOURCE", help="where --key names are looked for, as SOURCE/<KEY>.ckpt")
    p.add_argument(
        "--key",
        dest="keys",
        action="append",
        default=[],
        metavar="KEY",
        help="a key to fetch from --default-source (repeatable)",
    )
    p.add_argument(
        "--collect-in",
        metavar="DIR",
        help="the collection folder (default: the config's, else ./model_checkpoints); 'none' places "
        "nothing: Hub files stay in the Hugging Face cache, URLs go to $PL_PRETRAIN_CACHE",
    )
    p.add_argument(
        "--strategy",
        choices=[s.name for s in LocalStrategy],
        help="how files are placed (default: the config's, else SYMLINK); use the job's own, or the job fetches again",
    )
    p.add_argument("--revision", help="Hub branch, tag or commit (default: the config's fetch_config.revision)")
    p.add_argument(
        "--checksum",
        dest="checksums",
        action="append",
        default=[],
        metavar="KEY=sha256:HEX",
        type=_pair("KEY=sha256:HEX"),
        help="pin a key's file (repeatable); a mismatch removes it, exit 1",
    )
    p.add_argument("--overwrite", action="store_true", help="fetch and place again even when the folder holds the file")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="download progress bars (default: when stderr is a terminal)",
    )
    p.add_argument("--json", action="store_true", help="print what was collected as JSON")
    p.set_defaults(command=run_fetch)


@dataclass
class FetchJob:
    """One Pretrainer's worth of files to collect (a command line, or one callback of a config)."""

    collect_in: pathlib.Path | None
    keys: list[str]
    paths: dict[str, str]
    default_source: str | None = None
    checksums: dict[str, str] = dataclasses.field(default_factory=dict)
    conditions: dict[str, bool] = dataclasses.field(default_factory=dict)
    strategy: LocalStrategy = LocalStrategy.SYMLINK
    config: FetchConfig = dataclasses.field(default_factory=FetchConfig)


def run_fetch(args: argparse.Namespace) -> int:
    """Collects every key of every job, then prints one line per key; returns the exit code."""
    jobs = _fetch_jobs(args)
    if args.progress is not None:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if args.progress else disable_progress_bars)()
    rows = []
    for job in jobs:
        pretrainer = Pretrainer(
            job.collect_in,
            {key: None for key in job.keys},  # nothing is loaded: the keys are what is fetched
            job.paths,
            conditions=job.conditions,
            checksums=job.checksums,
        )
        pretrainer.collect_files(job.default_source, local_strategy=job.strategy, fetch_config=job.config)
        rows.extend(_fetched_row(key, fetched, job) for key, fetched in pretrainer.collected.items())
    if args.json:
        _print_json(rows)
        return EXIT_OK
    _print_table(
        ["key", "status", "size", "sha256", "placed", "from"],
        [
            [
                r["key"],
                r["status"],
                format_bytes(r["size"]),
                r["sha256"],
                _shown_path(r["placed"]) + _shards_note(r["shards"]),
                r["from"],
            ]
            for r in rows
        ],
    )
    folders = sorted({_shown_path(job.collect_in) for job in jobs if job.collect_in is not None})
    where = f"into {', '.join(folders)}" if folders else "into the caches (--collect-in none)"
    print(
        f"{len(rows)} file{'s' if len(rows) != 1 else ''} collected {where}. Compute nodes can now load them "
        "offline: HF_HUB_OFFLINE=1, or fetch_config allow_network: false."
    )
    return EXIT_OK


def _shards_note(count: int) -> str:
    return f" (index of {count} shards)" if count else ""


def _fetched_row(key: str, fetched: Fetched, job: FetchJob) -> dict[str, Any]:
    shards = shard_names(fetched.path)
    return {
        "key": key,
        "status": "reused" if fetched.reused else "fetched",
        "from": fetched.location,
        "commit": fetched.commit,
        "placed": str(fetched.path),
        "collect_in": None if job.collect_in is None else str(job.collect_in),
        "size": fetched.size,
        # The digest to pin with checksums={key: "sha256:..."}; hashed here when the fetch did not.
        "sha256": "sha256:" + (fetched.sha256 or file_sha256(fetched.path)),
        "shards": len(shards or []),
    }


def _fetch_jobs(args: argparse.Namespace) -> list[FetchJob]:
    """Returns what to collect: from the command line, or one job per PretrainerCallback of --config."""
    given_keys = bool(args.specs or args.keys or args.default_source)
    if args.config and given_keys:
        raise UsageError("Give KEY=SOURCE/FILE specs (or --default-source and --key), or --config, not both.")
    if args.config:
        jobs = _jobs_from_config(args.config)
    elif given_keys:
        jobs = [_job_from_command_line(args)]
    else:
        raise UsageError("Nothing to fetch: give KEY=SOURCE/FILE specs, --default-source with --key, or --config.")
    for job in jobs:
        if args.collect_in is not None:
            job.collect_in = None if args.collect_in.lower() == "none" else pathlib.Path(args.collect_in)
        if args.strategy is not None:
            job.strategy = LocalStrategy[args.strategy]
        changes: dict[str, Any] = {"allow_network": True}  # this is the machine with network
        if args.revision is not None:
            changes["revision"] = args.revision
        if args.overwrite:
            changes["overwrite"] = True
        if args.progress is not None:
            changes["progress"] = args.progress
        job.config = dataclasses.replace(job.config, **changes)
    checksums = dict(args.checksums)
    unknown = [key for key in checksums if not any(key in job.keys for job in jobs)]
    if unknown:
        known = sorted({key for job in jobs for key in job.keys})
        raise UsageError(
            f"--checksum names {', '.join(map(repr, unknown))}, which is not a key to fetch ({', '.join(known)})."
        )
    for job in jobs:
        job.checksums.update({key: value for key, value in checksums.items() if key in job.keys})
    return jobs


def _job_from_command_line(args: argparse.Namespace) -> FetchJob:
    paths = dict(args.specs)
    keys = list(dict.fromkeys([*paths, *args.keys]))
    if args.default_source is not None and not args.keys:
        raise UsageError("--default-source needs the keys to fetch from it: --key KEY (repeatable).")
    return FetchJob(pathlib.Path("model_checkpoints"), keys, paths, args.default_source)


def _jobs_from_config(text: str) -> list[FetchJob]:
    config = _read_yaml(text)
    jobs = []
    for init_args in _pretrainer_callbacks(config, f"'{text}'"):
        where = f"'{text}'"
        keys = list(_mapping(init_args, "loadables", where))
        if not keys:
            raise UsageError(f"{where}: a PretrainerCallback has no loadables, so nothing to fetch.")
        collect_in = init_args.get("collect_in", "./model_checkpoints")
        strategy = init_args.get("local_strategy", "SYMLINK")
        name = str(strategy).rsplit(".", 1)[-1].upper()
        if name not in LocalStrategy.__members__:
            raise UsageError(
                f"{where}: local_strategy {strategy!r} is not one of {', '.join(LocalStrategy.__members__)}."
            )
        jobs.append(
            FetchJob(
                collect_in=None if collect_in is None else pathlib.Path(str(collect_in)),
                keys=keys,
                paths={key: str(value) for key, value in _mapping(init_args, "paths", where).items()},
                default_source=None if init_args.get("default_source") is None else str(init_args["default_source"]),
                checksums={key: str(value) for key, value in _mapping(init_args, "checksums", where).items()},
                conditions={k: v for k, v in _mapping(init_args, "conditions", where).items() if isinstance(v, bool)},
                strategy=LocalStrategy[name],
                config=_fetch_config(init_args.get("fetch_config"), where),
            )
        )
    return jobs


def _fetch_config(value: Any, where: str) -> FetchConfig:
    """Returns the FetchConfig a config's ``fetch_config`` entry describes (fields, or class_path + init_args)."""
    if value is None:
        return FetchConfig()
    if isinstance(value, dict) and "class_path" in value:
        value = value.get("init_args") or {}
    if not isinstance(value, dict):
        raise UsageError(f"{where}: fetch_config is a {type(value).__name__}, not a mapping of FetchConfig fields.")
    try:
        return FetchConfig(**value)
    except TypeError as error:
        known = ", ".join(f.name for f in dataclasses.fields(FetchConfig))
        raise UsageError(f"{where}: fetch_config: {error} (FetchConfig fields: {known}).") from None


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    """Prints left-aligned columns, the last one unpadded."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join([*(str(row[i]).ljust(widths[i]) for i in range(len(widths))), str(row[-1])]).rstrip())


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------

INSPECT_DESCRIPTION = """\
Show what a checkpoint file holds: its format, its tensors' names, shapes and dtypes, the number of
parameters and bytes, and (for a Lightning checkpoint) the entries beside the state dict. The file
is read as a transfer reads it (format found from the content; weights_only unpickling): through a
memory map, so memory does not grow with the file's size. Legacy (non-zip) torch files cannot be
mapped and are read whole.

Formats: PyTorch zip or legacy pickle (.ckpt .pt .pth .bin), Lightning checkpoints (their
state_dict), safetensors, Hugging Face sharded checkpoints (a *.index.json and its shards).

examples:
  pl-pretrain inspect model_checkpoints/encoder.ckpt
  pl-pretrain inspect model.safetensors.index.json --filter 'encoder.*' --limit 20
  pl-pretrain inspect encoder.ckpt --json --sha256"""


def _add_inspect(commands: Any) -> None:
    p = _subparser(
        commands, "inspect", "show a checkpoint's format, keys, shapes, dtypes and size", INSPECT_DESCRIPTION
    )
    p.add_argument("file", metavar="FILE", help="a checkpoint file, or a sharded checkpoint's *.index.json")
    p.add_argument(
        "--filter",
        dest="filters",
        action="append",
        default=[],
        metavar="GLOB",
        help="list only keys matching a glob ('*' crosses dots; repeatable); totals stay the file's",
    )
    p.add_argument("--limit", type=_count, metavar="N", help="list at most N keys")
    p.add_argument("--sha256", action="store_true", help="also hash the file (reads it whole: slow for big files)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(command=run_inspect)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def run_inspect(args: argparse.Namespace) -> int:
    """Prints what the checkpoint holds; returns the exit code."""
    path = _existing_file(args.file, "Checkpoint")
    info = describe_checkpoint(path, filters=args.filters, limit=args.limit, sha256=args.sha256)
    if args.json:
        _print_json(info)
        return EXIT_OK
    summary = [
        ("file", str(args.file)),
        (
            "format",
            info["format"] + (f" (Lightning {info['lightning_version']})" if info.get("lightning_version") else ""),
        ),
        ("size", f"{format_bytes(info['file_bytes'])} on disk"),
        ("tensors", f"{info['tensors']:,}"),
        ("parameters", f"{info['parameters']:,} ({format_bytes(info['tensor_bytes'])})"),
        ("dtypes", ", ".join(f"{dtype} ({n})" for dtype, n in info["dtypes"].items())),
    ]
    if info["shards"]:
        summary.append(("shards", f"{len(info['shards'])}: {', '.join(info['shards'])}"))
    if info["other_entries"]:
        summary.append(("not loaded", ", ".join(f"{k}: {v}" for k, v in info["other_entries"].items())))
    if info.get("sha256"):
        summary.append(("sha256", info["sha256"]))
    width = max(len(name) for name, _ in summary)
    for name, value in summary:
        print(f"{name.ljust(width)}  {value}")
    print()
    _print_table(["key", "shape", "dtype"], [[k["key"], str(k["shape"]), k["dtype"]] for k in info["keys"]])
    if info["shown"] < info["matching"] or args.filters:
        print(f"({info['shown']} of {info['matching']} matching keys shown; the file holds {info['tensors']})")
    return EXIT_OK


def describe_checkpoint(
    path: pathlib.Path, *, filters: Sequence[str] = (), limit: int | None = None, sha256: bool = False
) -> dict[str, Any]:
    """Returns what a checkpoint holds, as plain data: format, counts, sizes, dtypes and its keys.

    The tensors come from `read_state_dict` (memory-mapped, nothing copied); parameters and bytes
    count each stored tensor once, even when several names share it (tied weights).
    """
    state, fmt = read_state_dict(path)
    seen: set[tuple[Any, ...]] = set()
    parameters = tensor_bytes = 0
    dtypes: dict[str, int] = {}
    for tensor in state.values():
        dtype = str(tensor.dtype).removeprefix("torch.")
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if identity not in seen:
            seen.add(identity)
            parameters += tensor.numel()
            tensor_bytes += tensor.numel() * tensor.element_size()
    matching = [key for key in state if not filters or any(fnmatch.fnmatchcase(key, p) for p in filters)]
    shown = matching if limit is None else matching[:limit]
    top = _top_level(path, fmt)
    info: dict[str, Any] = {
        "file": str(path),
        "format": fmt,
        "file_bytes": path.stat().st_size,
        "tensors": len(state),
        "parameters": parameters,
        "tensor_bytes": tensor_bytes,
        "dtypes": dtypes,
        "shards": shard_names(path) or [],
        "lightning_version": top.get("pytorch-lightning_version"),
        "other_entries": {key: _brief(value) for key, value in top.items() if key != "state_dict"},
        "matching": len(matching),
        "shown": len(shown),
        "keys": [
            {"key": k, "shape": list(state[k].shape), "dtype": str(state[k].dtype).removeprefix("torch.")}
            for k in shown
        ],
    }
    if sha256:
        info["sha256"] = "sha256:" + file_sha256(path)
    return info


def _top_level(path: pathlib.Path, fmt: str) -> dict[str, Any]:
    """Returns the top-level entries of a zip torch file that holds a ``state_dict`` entry (else {})."""
    if fmt not in ("torch", "lightning") or detect_format(path) != "torch":
        return {}  # safetensors and indexes hold only tensors; a legacy pickle cannot be mapped, and is not read twice
    import torch

    # Mapped, with the same safe unpickler as the transfer: reading it again costs the pickle only.
    top = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(top, dict) or not isinstance(top.get("state_dict"), Mapping):
        return {}
    return dict(top)


def _brief(value: Any) -> str:
    """Returns a short description of a checkpoint entry that is not parameters."""
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k}={_brief(v)}" for k, v in list(value.items())[:4])
        more = ", ..." if len(value) > 4 else ""
        return f"{{{inner}{more}}}" if len(inner) <= 60 else f"dict of {len(value)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"tensor {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------

PLAN_DESCRIPTION = """\
A dry run of loading CHECKPOINT into a model: the checkpoint's keys are matched against the
model's by the transfer's own code, with the mapping options applied, and nothing is copied. It
prints what would load, be missing, unexpected or mismatched (with both shapes), then a verdict:
exit 0 when a real load would succeed, 1 when it would fail (a shape mismatch under
--on-mismatch error, anything left over under --strict).

The model is built on the meta device (no memory for its weights; a normal build if that fails),
from an import path (--model) or from a LightningCLI config's `model` section (--config), whose
PretrainerCallback also gives the loadable's attribute and transfer_options. Options on the
command line override the config's.

examples:
  pl-pretrain plan encoder.ckpt --model mypkg.models:Encoder --init-args '{"dim": 256}'
  pl-pretrain plan pretrained.ckpt --model examples/tiny_model.py:KeywordClassifier --attribute encoder \\
      --key-map encoder.=
  pl-pretrain plan pretrained.ckpt --config job.yaml --key encoder --model examples/tiny_model.py:KeywordClassifier
  pl-pretrain plan model.ckpt --model mypkg:Net --exclude 'head.*' --on-mismatch skip --json"""


def _add_plan(commands: Any) -> None:
    p = _subparser(
        commands, "plan", "dry-run a load: what would load, be missing, unexpected or mismatched", PLAN_DESCRIPTION
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="the checkpoint file (or *.index.json) to load")
    p.add_argument(
        "--model",
        metavar="IMPORT_PATH",
        help="the model's class or factory: pkg.module:Name, or path/to/file.py:Name (with --config: the "
        "LightningModule class, when the config's model section has no class_path)",
    )
    p.add_argument(
        "--init-args",
        metavar="JSON",
        type=_json_object,
        default={},
        help="keyword arguments for the model, as a JSON object (e.g. '{\"num_classes\": 4}')",
    )
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="a LightningCLI config: the model from its model section, the loadable's attribute and "
        "transfer_options from its PretrainerCallback",
    )
    p.add_argument(
        "--key", help="the loadable key (with --config: which of the callback's loadables; default: its only one)"
    )
    p.add_argument(
        "--attribute",
        metavar="PATH",
        help="the submodule to load into, e.g. 'encoder' or 'model.decoder' (default: the whole model, or "
        "the callback's attribute for --key)",
    )
    p.add_argument(
        "--key-map",
        dest="key_map",
        action="append",
        metavar="OLD=NEW",
        type=_pair("OLD=NEW (file prefix=model prefix, either may be empty)", empty_key=True, empty_value=True),
        help="rename file key prefixes (repeatable; the longest prefix wins; keys under no prefix are left "
        "out: add '=' to keep them)",
    )
    p.add_argument("--include", action="append", metavar="GLOB", help="load only the model keys matching (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="never load the model keys matching (repeatable)")
    p.add_argument(
        "--on-mismatch", choices=["error", "skip"], help="a key with another shape: fail, or keep the model's"
    )
    p.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fail when anything is missing, unexpected or mismatched",
    )
    p.add_argument("--limit", type=_count, metavar="N", help="list at most N keys of each kind")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(command=run_plan)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'{text!r} is not a JSON object ({{"name": value, ...}})')
    return value


@dataclass
class PlanTarget:
    """What a plan loads into, and how it was found."""

    key: str
    model_name: str
    module: Any  # torch.nn.Module
    attribute: str
    on_meta: bool
    options: TransferOptions
    note: str = ""


def run_plan(args: argparse.Namespace) -> int:
    """Dry-runs the load and prints the diagnosis; returns 0 if a real load would succeed, else 1."""
    checkpoint = _existing_file(args.checkpoint, "Checkpoint")
    target = _plan_target(args)
    options = _override(target.options, args)
    report, error = diagnose_transfer(target.module, checkpoint, options, shapes_only=target.on_meta)
    verdict, code = _verdict(report, error)
    hint = _suggest_key_map(report)
    if args.json:
        shapes = _shapes(target.module)
        _print_json(
            {
                "key": target.key,
                "model": target.model_name,
                "attribute": target.attribute,
                "built_on": "meta" if target.on_meta else "cpu",
                "checkpoint": str(args.checkpoint),
                "options": _options_shown(options),
                "report": report.to_dict(),
                "shapes": {k: shapes.get(k) for k in [*report.loaded, *report.missing]},
                "would_succeed": error is None,
                "complete": report.complete,
                "error": None if error is None else " ".join(str(error).split()),
                "suggested_key_map": None if hint is None else {hint[0]: hint[1]},
                "verdict": verdict,
            }
        )
        return code
    module = target.module
    built = "the meta device (no memory for its weights)" if target.on_meta else f"cpu{target.note}"
    what = f"{target.attribute} ({type(module).__name__})" if target.attribute else type(module).__name__
    print(f"model       {target.model_name}, built on {built}")
    print(f"loads into  {what}: {len(_shapes(module))} tensors")
    print(f"checkpoint  {args.checkpoint}")
    print(f"options     {_options_text(options)}")
    print()
    # The load report's table (header and row); its per-key lines are printed in full below.
    print("\n".join(format_reports({target.key: report}).splitlines()[:2]))
    if report.prefix:
        print(f"prefix '{report.prefix}': found in front of every model key in the file, and stripped")
    print()
    _print_keys(report, _shapes(module), args.limit)
    if hint:
        old, new = hint
        where = f"under the prefix '{old}'" if old else f"without the model's prefix '{new}'"
        print(f"hint: the missing keys are in the file {where}; try --key-map '{old}={new}'")
    print(f"verdict: {verdict}")
    return code


def _plan_target(args: argparse.Namespace) -> PlanTarget:
    if args.config:
        return _target_from_config(args)
    if not args.model:
        raise UsageError("plan needs the model: --model pkg.module:Class, or --config job.yaml.")
    factory = _import_object(args.model)
    model, on_meta, note = _build(lambda: factory(**args.init_args), args.model)
    attribute = args.attribute or ""
    key = args.key or attribute or "model"
    return PlanTarget(
        key,
        _call_text(args.model, args.init_args),
        _submodule(model, attribute),
        attribute,
        on_meta,
        TransferOptions(),
        note,
    )


def _target_from_config(args: argparse.Namespace) -> PlanTarget:
    config = _read_yaml(args.config)
    where = f"'{args.config}'"
    loadables: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for init_args in _pretrainer_callbacks(config, where):
        for key, attribute in _mapping(init_args, "loadables", where).items():
            if key in loadables:
                raise UsageError(f"{where}: two PretrainerCallbacks load the key '{key}'.")
            loadables[key] = attribute
        options.update(_mapping(init_args, "transfer_options", where))
    key = args.key
    if key is None:
        if len(loadables) != 1:
            raise UsageError(f"{where} loads {', '.join(sorted(loadables)) or 'nothing'}; choose one with --key.")
        key = next(iter(loadables))
    if key not in loadables:
        raise UsageError(f"--key '{key}' is not a loadable of {where} ({', '.join(sorted(loadables)) or 'none'}).")
    attribute = args.attribute if args.attribute is not None else str(loadables[key])

    section = config.get("model") or {}
    if not isinstance(section, dict):
        raise UsageError(f"{where}: the model section is a {type(section).__name__}, not a mapping.")
    if "class_path" in section:
        class_path = str(section["class_path"])
        init = dict(section.get("init_args") or {})
    elif args.model:
        class_path, init = args.model, dict(section)
    else:
        raise UsageError(
            f"{where}: the model section has no class_path (the LightningCLI script names the class); "
            "give it with --model pkg.module:Class."
        )
    if args.model and "class_path" in section:
        class_path = args.model
    init.update(args.init_args)
    cls = _import_object(class_path)
    model, on_meta, note = _build(lambda: _instantiate(cls, init, class_path), class_path)
    return PlanTarget(
        key,
        _call_text(class_path, init),
        _submodule(model, attribute),
        attribute,
        on_meta,
        TransferOptions.coerce(options.get(key), key=key),
        note,
    )


def _instantiate(cls: Any, init: dict[str, Any], class_path: str) -> Any:
    """Returns ``cls`` built from `init` the way LightningCLI builds its model (jsonargparse)."""
    try:
        from jsonargparse import ArgumentParser
    except ImportError:
        raise UsageError("plan --config needs jsonargparse (pip install 'jsonargparse[signatures]').") from None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "model", fail_untyped=False)
    try:
        parsed = parser.parse_object({"model": init})
    except argparse.ArgumentError as error:
        raise UsageError(f"the config's model arguments do not fit {class_path}: {error}") from None
    build = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse >= 4.49: instantiate
    return build(parsed).model


def _import_object(spec: str) -> Any:
    """Returns the object an import path names: ``pkg.module:Name``, ``pkg.module.Name`` or ``file.py:Name``."""
    module_name, sep, name = spec.partition(":")
    if not sep:
        module_name, _, name = spec.rpartition(".")
    if not module_name or not name:
        raise UsageError(f"'{spec}' is not an import path: give pkg.module:Name or path/to/file.py:Name.")
    try:
        if module_name.endswith(".py"):
            file = pathlib.Path(module_name).expanduser().resolve()
            if not file.is_file():
                raise UsageError(f"'{spec}': the file '{module_name}' does not exist.")
            sys.path.insert(0, str(file.parent))  # its own imports of its neighbours, as `python file.py` allows
            module = sys.modules.get(file.stem)
            if module is None or os.path.realpath(getattr(module, "__file__", "") or "") != str(file):
                loader_spec = importlib.util.spec_from_file_location(file.stem, file)
                module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
                sys.modules[file.stem] = module
                loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` does; the console script does not
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as error:  # the user's module failing to import: say so in one line
        raise UsageError(f"Could not import '{module_name}' (from '{spec}'): {type(error).__name__}: {error}") from None
    try:
        obj = module
        for part in name.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise UsageError(f"'{module_name}' has no '{name}' (from '{spec}').") from None
    if not callable(obj):
        raise UsageError(f"'{spec}' is a {type(obj).__name__}, not a class or a function that builds the model.")
    return obj


def _build(make: Any, what: str) -> tuple[Any, bool, str]:
    """Returns (model, built on meta, a note): on the meta device when possible, else normally."""
    import torch

    try:
        with torch.device("meta"):
            model = make()
            _configure(model)
        return model, True, ""
    except UsageError:
        raise
    except Exception as meta_error:
        why = f"{type(meta_error).__name__}: {meta_error}".splitlines()[0]
    try:
        model = make()
        _configure(model)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"Could not build the model {what}: {type(error).__name__}: {error}") from None
    return model, False, f" (the meta device failed: {why})"


def _configure(model: Any) -> None:
    # Layers a LightningModule builds in configure_model exist only after it, as in a real job.
    configure = getattr(model, "configure_model", None)
    if callable(configure):
        configure()


def _submodule(model: Any, attribute: str) -> Any:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"The model is a {type(model).__name__}, not a torch.nn.Module.")
    try:
        module = model.get_submodule("" if attribute in ("", "self") else attribute)
    except AttributeError as error:
        children = ", ".join(name for name, _ in model.named_children()) or "no submodules"
        raise UsageError(
            f"No submodule '{attribute}' in {type(model).__name__} ({error}); it has: {children}."
        ) from None
    return module


def _call_text(spec: str, init: Mapping[str, Any]) -> str:
    arguments = ", ".join(f"{k}={v!r}" for k, v in init.items())
    return f"{spec}({arguments})"


def _override(options: TransferOptions, args: argparse.Namespace) -> TransferOptions:
    """Returns `options` with the fields given on the command line replaced."""
    changes: dict[str, Any] = {}
    if args.key_map:
        changes["key_map"] = dict(args.key_map)
    if args.include:
        changes["include"] = args.include
    if args.exclude:
        changes["exclude"] = args.exclude
    if args.on_mismatch is not None:
        changes["on_mismatch"] = args.on_mismatch
    if args.strict is not None:
        changes["strict"] = args.strict
    return dataclasses.replace(options, **changes) if changes else options


def _options_shown(options: TransferOptions) -> dict[str, Any]:
    """Returns the fields of `options` that differ from the defaults."""
    shown = {}
    for f in dataclasses.fields(TransferOptions):
        value = getattr(options, f.name)
        if value != getattr(TransferOptions(), f.name):
            shown[f.name] = list(value) if isinstance(value, tuple) else value
    return shown


def _options_text(options: TransferOptions) -> str:
    shown = _options_shown(options)
    return (
        ", ".join(f"{k}={v!r}" for k, v in shown.items())
        or "the defaults (no key map, on_mismatch='error', not strict)"
    )


def _shapes(module: Any) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in module.state_dict(keep_vars=True).items() if hasattr(t, "shape")}


def _print_keys(report: TransferReport, shapes: Mapping[str, list[int]], limit: int | None) -> None:
    """Prints every key of the plan, by kind, with its shape in the model (both shapes when mismatched)."""
    groups = [
        ("would load", [(k, str(shapes.get(k))) for k in report.loaded]),
        ("missing (the model keeps its values)", [(k, str(shapes.get(k))) for k in report.missing]),
        ("unexpected (in the file, not read)", [(k, "") for k in report.unexpected]),
        ("mismatched (file vs model)", [(k, f"{list(a)} vs {list(b)}") for k, (a, b) in report.mismatched.items()]),
        ("excluded (left out on purpose)", [(k, "") for k in report.excluded]),
    ]
    for title, rows in groups:
        if not rows and title != "would load":
            continue
        print(f"{title}: {len(rows)}")
        shown = rows if limit is None else rows[:limit]
        width = max((len(k) for k, _ in shown), default=0)
        for key, detail in shown:
            print(f"  {key.ljust(width)}  {detail}".rstrip())
        if len(shown) < len(rows):
            print(f"  ... ({len(rows) - len(shown)} more; --limit)")


def _verdict(report: TransferReport, error: PretrainerError | None) -> tuple[str, int]:
    """Returns the one-line verdict and the exit code: 1 when a real load would raise, else 0."""
    if error is not None:
        return (
            f"FAIL: a real load would raise {type(error).__name__} and copy nothing: {' '.join(str(error).split())}",
            EXIT_FAILED,
        )
    copied = f"copy {len(report.loaded)} tensors ({format_bytes(report.bytes)})" if report.loaded else "copy nothing"
    if report.complete:
        return f"OK: a real load would {copied} and leave nothing missing, unexpected or mismatched.", EXIT_OK
    left = [
        f"{len(report.missing)} missing" if report.missing else "",
        f"{len(report.unexpected)} unexpected" if report.unexpected else "",
        f"{len(report.mismatched)} mismatched" if report.mismatched else "",
    ]
    return (
        f"OK, incomplete: a real load would {copied} and succeed with {', '.join(x for x in left if x)} "
        "(a warning in the job; --strict makes it a failure).",
        EXIT_OK,
    )


def _suggest_key_map(report: TransferReport) -> tuple[str, str] | None:
    """Returns (file prefix, model prefix) when one renaming turns left-over file keys into most missing ones.

    Only the simplest renaming is guessed: a prefix added to or removed from whole names. File
    keys are looked for among the unexpected ones and those a key map left out.
    """
    if not report.missing:
        return None
    votes: dict[tuple[str, str], int] = {}
    for missing in report.missing:
        for key in [*report.unexpected, *report.excluded]:
            if key.endswith("." + missing):
                pair = (key[: -len(missing)], "")
            elif missing.endswith("." + key):
                pair = ("", missing[: -len(key)])
            else:
                continue
            votes[pair] = votes.get(pair, 0) + 1
    if not votes:
        return None
    best, count = max(votes.items(), key=lambda item: item[1])
    return best if count * 2 >= len(report.missing) else None
