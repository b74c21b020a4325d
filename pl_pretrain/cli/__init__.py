"""`pl-pretrain fetch | inspect | plan`: the entry point, its commands and its exit codes.

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

One module per command (`fetch`, `inspect`, `plan`, each with its argparse setup and its run
function), `config` for the LightningCLI config they read, `_model` for building a plan's model,
`_common` for the parser, the exit codes and the printing helpers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pl_pretrain.cli._common import EXIT_CODES, EXIT_FAILED, EXIT_OK, EXIT_USAGE, PROG, _Parser
from pl_pretrain.cli._common import UsageError as UsageError
from pl_pretrain.cli.fetch import FetchJob as FetchJob
from pl_pretrain.cli.fetch import _add_fetch
from pl_pretrain.cli.fetch import run_fetch as run_fetch
from pl_pretrain.cli.inspect import _add_inspect
from pl_pretrain.cli.inspect import describe_checkpoint as describe_checkpoint
from pl_pretrain.cli.inspect import run_inspect as run_inspect
from pl_pretrain.cli.plan import PlanTarget as PlanTarget
from pl_pretrain.cli.plan import _add_plan
from pl_pretrain.cli.plan import run_plan as run_plan
from pl_pretrain.errors import ConfigurationError, PretrainerError

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]


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
