"""`pl-pretrain plan`: a dry run of a load, by the transfer's own matching and checks, copying nothing."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pl_pretrain.cli._common import (
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    _count,
    _existing_file,
    _pair,
    _print_json,
    _subparser,
)
from pl_pretrain.cli._model import _build, _call_text, _import_object, _instantiate, _submodule
from pl_pretrain.cli.config import _loadables_of, _read_yaml
from pl_pretrain.errors import PretrainerError
from pl_pretrain.pretrainer import shard_folder_name
from pl_pretrain.transfer import TransferOptions, TransferReport, diagnose_transfer, format_bytes, format_reports
from pl_pretrain.transfer.keys import suggest_key_map

__all__ = ["PlanTarget", "run_plan"]

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
    report, error = diagnose_transfer(
        target.module,
        checkpoint,
        options,
        shapes_only=target.on_meta,
        shard_dir=checkpoint.parent / shard_folder_name(checkpoint.name),
    )
    verdict, code = _verdict(report, error)
    hint = suggest_key_map(report.missing, [*report.unexpected, *report.excluded])
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
    loadables, options = _loadables_of(config, where)
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
