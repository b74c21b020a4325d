"""Pretrained weights straight into sharded models: FSDP2 (``fully_shard``), tensor parallel, both.

The user's story: a model too big for one process is built on the meta device in
``configure_model`` and sharded by Lightning's ModelParallelStrategy (or by ``fully_shard`` under
torchrun); the PretrainerCallback (or the Pretrainer) fills every rank's shards from the
pretrained files, each rank reading only its slice, and leaves the new head to its own
initialisation. Every test asserts what each rank saw. Lightning re-executes the script for its
other ranks, so the Lightning runs are subprocesses (tests/scripts/sharded_job.py).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from dist import run_ranks
from sharded_jobs import load_and_count, load_refused
from sharded_models import PARTS, reference_state, write_sources

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "scripts"
LOADED = [name for name in reference_state() if not name.startswith("head.")]

pytestmark = pytest.mark.slow


def _records(folder: pathlib.Path, event: str, world: int) -> list[dict]:
    return [json.loads((folder / f"{event}-rank{r}.json").read_text()) for r in range(world)]


def _assert_loaded_everywhere(records: list[dict]) -> None:
    for record in records:
        assert record["equal"] == {name: True for name in LOADED}  # full_tensor() equals the file, every tensor
        assert record["head_finite"] and record["head_initialised"]
        assert record["head_inits"] == 1  # its own initialisation, once, on real memory
    reports = [r["reports"] for r in records]
    lists = [
        {k: (v["loaded"], v["missing"], v["unexpected"], v["mismatched"], v["bytes"]) for k, v in rep.items()}
        for rep in reports
    ]
    assert all(x == lists[0] for x in lists)  # global names, the same lists on every rank
    assert sorted(lists[0]) == sorted(PARTS)


@pytest.mark.parametrize(
    ("devices", "dp", "tp"),
    [(2, 2, 1), (4, 4, 1), (2, 1, 2), (4, 2, 2)],
    ids=["fsdp2-2ranks", "fsdp2-4ranks", "tp-2ranks", "dp2xtp2-4ranks"],
)
def test_model_parallel_strategy_loads_every_rank_slice_from_every_format(tmp_path, devices, dp, tp):
    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps(write_sources(tmp_path / "published")))
    records = tmp_path / "records"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "sharded_job.py"), "--sources", str(sources), "--collect-in",
         str(tmp_path / "collected"), "--devices", str(devices), "--dp", str(dp), "--tp", str(tp)],
        env={**os.environ, "PL_PRETRAIN_RECORD_DIR": str(records)},
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    starts = _records(records, "train_start", devices)
    _assert_loaded_everywhere(starts)
    placements = starts[0]["placements"]
    assert "Shard(dim=0)" in placements["decoder.weight"]  # 7 rows: uneven over 2 and 4 ranks
    if tp > 1:
        assert "Shard(dim=1)" in placements["encoder.2.weight"]  # row-wise tensor parallel
        assert "Shard" in placements["encoder.0.weight"]  # column-wise (strided under FSDP on a 2-D mesh)
    decoder = [r["reports"]["decoder"] for r in starts]
    if tp == 1:
        # dim-0 shards over every rank: each copied its slice, the slices add up to the file
        assert sum(d["local_bytes"] for d in decoder) == decoder[0]["bytes"] == (7 * 7 + 7) * 4
        assert all(d["local_bytes"] < d["bytes"] for d in decoder)
    ends = _records(records, "train_end", devices)
    assert all(e["steps"] == 2 and set(e["changed"]) == set(LOADED) for e in ends)  # training steps ran


def test_fully_shard_under_torchrun_without_lightning(tmp_path):
    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps(write_sources(tmp_path / "published")))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(SCRIPTS / "torchrun_sharded.py"), str(sources), str(tmp_path / "collected"), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for record in records:
        assert record["equal"] == {name: True for name in LOADED}
        assert record["loss"] == record["loss"]  # a training step ran on the loaded shards (not NaN)
    assert (
        records[0]["reports"]["decoder"]["local_bytes"] + records[1]["reports"]["decoder"]["local_bytes"]
        == (records[0]["reports"]["decoder"]["bytes"])
    )


def test_sharded_load_sends_no_tensor_bytes_through_the_process_group(tmp_path):
    results = run_ranks(load_and_count, 2, args=(str(tmp_path), str(tmp_path / "collected")), timeout=240)
    for result in results:
        assert result.ok, result.traceback
        seen = result.value
        assert seen["equal"] == {name: True for name in LOADED}
        assert seen["control_bytes"] == 4000  # the counter sees a collective of 1000 floats
        assert seen["traffic"]["tensor_bytes"] == 0, seen["ops"]  # the load itself: only object exchanges
        assert 0 < seen["traffic"]["object_bytes"] < 64 * 1024


@pytest.mark.parametrize(
    ("case", "error_type", "says"),
    [
        ("mismatch", "TransferError", "weight: file [5, 7] vs model [7, 7]"),
        ("strict", "TransferError", "Strict transfer"),
        ("partial", "ConfigurationError", "Partial"),
        ("dtype", "ConfigurationError", "which is sharded (a DTensor"),
    ],
    ids=["mismatch", "strict", "partial", "dtype"],
)
def test_a_load_that_cannot_succeed_fails_on_every_rank_before_any_shard_is_touched(tmp_path, case, error_type, says):
    results = run_ranks(load_refused, 2, args=(str(tmp_path), str(tmp_path / "collected"), case), timeout=240)
    errors = []
    for result in results:
        assert result.ok, result.traceback
        assert result.value["unchanged"]  # nothing copied into this rank's shards
        errors.append(result.value["error"])
    assert errors[0] == errors[1]  # the same error on every rank
    assert errors[0]["type"] == error_type and errors[0]["key"] == "decoder"
    assert says in errors[0]["text"] and "Nothing was loaded" in errors[0]["text"]
