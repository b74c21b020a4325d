"""`pl-pretrain fetch`: collect a job's files ahead of time, by the job's own `Pretrainer.collect_files`."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from typing import Any

from pl_pretrain._constants import DEFAULT_COLLECT_IN
from pl_pretrain.cli._common import EXIT_OK, UsageError, _pair, _print_json, _print_table, _shown_path, _subparser
from pl_pretrain.cli.config import FetchJob, _jobs_from_config
from pl_pretrain.fetching import Fetched, LocalStrategy, file_sha256
from pl_pretrain.pretrainer import Pretrainer
from pl_pretrain.transfer import format_bytes, shard_names

__all__ = ["FetchJob", "run_fetch"]

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
        help=f"the collection folder (default: the config's, else {DEFAULT_COLLECT_IN}); 'none' places "
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


def run_fetch(args: argparse.Namespace) -> int:
    """Collects every key of every job, then prints one line per key; returns the exit code."""
    jobs = _fetch_jobs(args)
    if args.progress is not None:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if args.progress else disable_progress_bars)()
    rows: list[dict[str, Any]] = []
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
    return FetchJob(pathlib.Path(DEFAULT_COLLECT_IN), keys, paths, args.default_source)
