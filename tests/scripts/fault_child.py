"""A collection job run as a child process by tests/test_faults_processes.py.

    python fault_child.py SPEC.json OUT.json

SPEC is a list of cases, each ``{"key", "path", "collect_in", "strategy", "fetch_config", "checksum", "seed"}``;
every case is a separate Pretrainer (one loadable) that collects and loads, so one failing case
does not stop the next. OUT receives one outcome per case: the error (type, text, key, source)
or the loaded weights' fingerprint, and what the collection folder holds afterwards. The test
kills this process, runs it with HF_HUB_OFFLINE=1, or runs it on a tiny private tmpfs.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from helpers import digest, module  # noqa: E402

from pl_pretrain import FetchConfig, LocalStrategy, Pretrainer, PretrainerError  # noqa: E402


def listing(folder: pathlib.Path) -> list[str]:
    """Returns every entry under `folder` (files, links, folders), relative, sorted."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run_case(case: dict) -> dict:
    key = case.get("key", "encoder")
    obj = module(seed=case.get("seed", 12345))
    collect_in = pathlib.Path(case["collect_in"]) if case.get("collect_in") else None
    pretrainer = Pretrainer(
        collect_in,
        {key: obj},
        paths={key: case["path"]},
        checksums={key: case["checksum"]} if case.get("checksum") else None,
    )
    outcome: dict = {"key": key, "error": None}
    try:
        paths = pretrainer.collect_files(
            local_strategy=LocalStrategy[case.get("strategy", "SYMLINK")],
            fetch_config=FetchConfig(**case.get("fetch_config", {})),
        )
        pretrainer.load_collected()
        outcome.update(digest=digest(obj), paths={k: str(v) for k, v in paths.items()})
    except PretrainerError as error:
        outcome.update(
            error=type(error).__name__,
            text=str(error),
            error_key=error.key,
            source=error.source,
            value_error=isinstance(error, ValueError),
        )
    outcome["listing"] = listing(collect_in) if collect_in is not None else []
    return outcome


def main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    cases = json.loads(pathlib.Path(spec_path).read_text())
    outcomes = [run_case(case) for case in cases]
    tmp = out_path + ".tmp"
    pathlib.Path(tmp).write_text(json.dumps(outcomes, indent=1))
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main()
