"""Ranks that do not meet: a rank lost before the first collection, ranks configured differently,
and a bad setting on one rank only. Every surviving rank must raise, within the default process
group's timeout, an error naming the rank at fault; nothing may wait the 24 hours that only a
fetch in progress is allowed.

The ranks are started by hand, without torchrun's agent (which would kill the survivors and hide
a hang): by the harness in tests/dist.py (fresh processes, a ``file://`` store), by a shell-like
loop of plain subprocesses with MASTER_ADDR/MASTER_PORT (rank 0 holds the store), and as two
Lightning "nodes" with NODE_RANK. Each test prints how long the survivors took to raise.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import rank_jobs
from dist import assert_all_ok, run_ranks
from helpers import ckpt_bytes, digest, free_port, module
from lightning_models import encoder
from servers import Fault

from pl_pretrain import ConfigurationError, Pretrainer

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "scripts"
PG_TIMEOUT_S = 10.0  # the default process group's timeout in these jobs: the bound on every wait
SLACK_S = 20.0  # process start and teardown on a loaded two-core machine


def _source(tmp_path: pathlib.Path, seed: int = 1) -> str:
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    (folder / "encoder.ckpt").write_bytes(ckpt_bytes(module(seed)))
    return str(folder)


# ------------------------------------------------------------------------------------------
# A rank lost before the first collection
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stay away", "die", "raise"])
def test_a_rank_lost_before_the_collection_ends_every_other_rank(tmp_path, how):
    cell = {"collect_in": str(tmp_path / "c"), "source": _source(tmp_path)}
    results = run_ranks(
        rank_jobs.collect_unless_absent,
        3,
        args=(cell, {2: how}),
        pg_timeout_s=PG_TIMEOUT_S,
        timeout=PG_TIMEOUT_S + 90,
        check=False,
        until_reported=[0, 1],  # the survivors; the rank that stays away is then killed
    )
    survivors = [r.value for r in results[:2]]
    for rank, (result, outcome) in enumerate(zip(results[:2], survivors, strict=True)):
        assert result.ok, f"rank {rank} did not end: {result.error_type} {result.error_text}"
        assert outcome["error"] == "PretrainerError", outcome
        assert "Rank 2 did not join the collection within 10 s" in outcome["text"], outcome["text"]
        assert outcome["rank_in_error"] == 2
        waited = outcome["raised_at"] - outcome["started"]
        print(f"[{how}] rank {rank} raised after {waited:.1f} s")
        assert waited < PG_TIMEOUT_S + SLACK_S
    assert not (tmp_path / "c" / "encoder.ckpt").exists()  # nobody fetched for a job that never met


def _by_hand(tmp_path: pathlib.Path, world: int, absent: dict[int, str]) -> tuple[list[dict | None], float]:
    spec = tmp_path / "spec.json"
    out = tmp_path / "out"
    out.mkdir()
    spec.write_text(
        json.dumps(
            {
                "collect_in": str(tmp_path / "c"),
                "source": _source(tmp_path),
                "pg_timeout_s": PG_TIMEOUT_S,
                "absent": {str(r): how for r, how in absent.items()},
            }
        )
    )
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPTS / "rank_by_hand.py"), str(spec), str(out)],
            env={
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for rank in range(world)
    ]
    started = time.monotonic()
    try:
        for rank, proc in enumerate(procs):
            if absent.get(rank) != "stay away":
                proc.wait(max(1.0, started + PG_TIMEOUT_S + 120 - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
    records = [json.loads(f.read_text()) if (f := out / f"rank{r}.json").exists() else None for r in range(world)]
    return records, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("lost", [2, 0])
def test_hand_launched_ranks_with_one_lost_all_raise(tmp_path, lost):
    # Rank 0 holds the store (MASTER_ADDR/PORT): when it is the one lost, the others lose the store too.
    records, _ = _by_hand(tmp_path, 3, {lost: "die"})
    survivors = [r for r in range(3) if r != lost]
    for rank in survivors:
        record = records[rank]
        assert record is not None, f"rank {rank} never ended (hung)"
        assert record["error"] == "PretrainerError", record
        if lost == 0:
            assert "Lost contact with the job's store" in record["text"], record["text"]
        else:
            assert "Rank 2 did not join the collection" in record["text"], record["text"]
        print(f"[by hand, rank {lost} lost] rank {rank} raised after {record['waited_s']:.1f} s")
        assert record["waited_s"] < PG_TIMEOUT_S + SLACK_S


@pytest.mark.slow
@pytest.mark.parametrize("how", ["die", "raise", "bad timeout"])
def test_two_hand_launched_lightning_nodes_one_lost_before_the_collection(tmp_path, http_server, how):
    http_server.add("models/encoder.ckpt", ckpt_bytes(encoder(seed=3)))
    records = tmp_path / "records"
    port = free_port()
    procs = []
    for node in (0, 1):
        env = {
            **os.environ,
            "PL_PRETRAIN_RECORD_DIR": str(records),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "NODE_RANK": str(node),
            "PL_PRETRAIN_TEST_LOST_NODE": "1",
            "OMP_NUM_THREADS": "1",
        }
        if how == "bad timeout" and node == 1:
            env["PL_PRETRAIN_COLLECT_TIMEOUT"] = "inf"
        lost = [] if how == "bad timeout" else ["--lost-before-collect", how]
        command = [
            sys.executable,
            str(SCRIPTS / "lightning_job.py"),
            "--source",
            f"{http_server.url}/models",
            "--collect-in",
            str(tmp_path / "c"),
            "--devices",
            "1",
            "--num-nodes",
            "2",
            "--pg-timeout",
            str(PG_TIMEOUT_S),
            *lost,
        ]
        procs.append(
            subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        )
    try:
        errors = [
            p.communicate(timeout=PG_TIMEOUT_S + 300)[1] for p in procs
        ]  # Lightning imports are slow on a loaded machine
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 3, f"node 0 did not raise a PretrainerError:\n{errors[0][-3000:]}"
    record = json.loads((records / "error-rank0.json").read_text())
    print(f"[lightning, node 1: {how}] node 0 raised {record['type']} after {record['seconds']:.1f} s (whole run)")
    if how == "bad timeout":
        assert procs[1].returncode == 3
        assert record == {**json.loads((records / "error-rank1.json").read_text()), "seconds": record["seconds"]}
        assert record["type"] == "ConfigurationError" and record["rank"] == 1
        assert "PL_PRETRAIN_COLLECT_TIMEOUT='inf'" in record["text"]
    else:
        assert procs[1].returncode != 0
        assert record["type"] == "PretrainerError" and record["rank"] == 1
        assert "Rank 1 did not join the collection within 10 s" in record["text"]
    assert record["seconds"] < PG_TIMEOUT_S + 60
    assert http_server.count("GET") == 0  # nothing was fetched for a job that never met


# ------------------------------------------------------------------------------------------
# A bad setting on one rank only
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("value", ["inf", "0", "-1"])
def test_a_bad_collect_timeout_on_one_rank_fails_every_rank(tmp_path, value):
    cell = {"collect_in": str(tmp_path / "c"), "source": _source(tmp_path)}
    results = run_ranks(
        rank_jobs.collect_cells,
        3,
        args=([cell],),
        rank_env=lambda rank: {"PL_PRETRAIN_COLLECT_TIMEOUT": value} if rank == 1 else {},
        pg_timeout_s=PG_TIMEOUT_S,
        timeout=PG_TIMEOUT_S + 90,
    )
    outcomes = [r[0] for r in assert_all_ok(results)]
    assert len({o["text"] for o in outcomes}) == 1, outcomes
    for outcome in outcomes:
        assert outcome["error"] == "ConfigurationError" and outcome["rank_in_error"] == 1, outcome
        assert f"PL_PRETRAIN_COLLECT_TIMEOUT={value!r} is not a finite, positive number of seconds" in outcome["text"]
        assert outcome["raised_at"] - outcome["started"] < PG_TIMEOUT_S  # no rank waited out a timeout
    assert not (tmp_path / "c" / "encoder.ckpt").exists()


@pytest.mark.parametrize("value", ["inf", "0", "-1", "soon"])
def test_a_bad_collect_timeout_is_a_configuration_error(tmp_path, monkeypatch, value):
    monkeypatch.setenv("PL_PRETRAIN_COLLECT_TIMEOUT", value)
    pretrainer = Pretrainer(tmp_path / "c", {"encoder": module(2)})
    with pytest.raises(ConfigurationError, match="PL_PRETRAIN_COLLECT_TIMEOUT=.* is not a finite, positive number"):
        pretrainer.collect_files(default_source=_source(tmp_path), internal_ddp_handling=True)
    assert not (tmp_path / "c" / "encoder.ckpt").exists()


# ------------------------------------------------------------------------------------------
# Ranks configured differently
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ranks_whose_configuration_differs_all_fail_naming_the_rank_and_the_field(tmp_path):
    source = _source(tmp_path)
    (pathlib.Path(source) / "decoder.ckpt").write_bytes(ckpt_bytes(module(2)))
    other = tmp_path / "other"
    other.mkdir()
    (other / "encoder.ckpt").write_bytes(ckpt_bytes(module(3)))
    pin = "sha256:" + "a" * 64
    drifts = {
        "a key only rank 1 has": ({"1": {"extra_keys": ["decoder"]}}, "Rank 1", "loadables"),
        "a key rank 1 lacks": ({"0": {"extra_keys": ["decoder"]}}, "Rank 1", "loadables"),
        "a condition false on rank 0 only": ({"0": {"conditions": {"encoder": False}}}, "Rank 1", "conditions"),
        "a condition false on rank 2 only": ({"2": {"conditions": {"encoder": "False"}}}, "Rank 2", "conditions"),
        "another source on rank 1": ({"1": {"source": str(other)}}, "Rank 1", "paths"),
        "another collect_in on rank 2": ({"2": {"collect_in": str(tmp_path / "elsewhere")}}, "Rank 2", "collect_in"),
        "a checksum on rank 1 only": ({"1": {"checksums": {"encoder": pin}}}, "Rank 1", "checksums"),
    }
    cells = [
        {"collect_in": str(tmp_path / "c" / str(i)), "source": source, "drift": drift}
        for i, (drift, _, _) in enumerate(drifts.values())
    ]
    per_rank = assert_all_ok(run_ranks(rank_jobs.collect_drifting, 3, args=(cells,), pg_timeout_s=PG_TIMEOUT_S))
    for index, (name, (_, rank_named, field)) in enumerate(drifts.items()):
        outcomes = [per_rank[rank][index] for rank in range(3)]
        assert len({o["text"] for o in outcomes}) == 1, f"{name}: ranks raised different errors: {outcomes}"
        for rank, outcome in enumerate(outcomes):
            assert outcome["error"] == "ConfigurationError", f"{name}: rank {rank}: {outcome}"
            assert f"{rank_named} is configured differently from rank 0 in {field}" in outcome["text"], name
        assert not (tmp_path / "c" / str(index) / "encoder.ckpt").exists(), f"{name}: something was fetched"
    # the same job, configured alike everywhere, then loads on every rank
    alike = [{"collect_in": str(tmp_path / "c" / "alike"), "source": source}]
    outcomes = [per[0] for per in assert_all_ok(run_ranks(rank_jobs.collect_drifting, 3, args=(alike,)))]
    assert {o["digest"] for o in outcomes} == {digest(module(1))}


def test_a_condition_that_raises_names_its_key(tmp_path):
    def broken() -> bool:
        raise ZeroDivisionError("division by zero")

    pretrainer = Pretrainer(tmp_path / "c", {"encoder": module(2)}, conditions={"encoder": broken})
    with pytest.raises(ConfigurationError, match=r"conditions\['encoder'\] raised ZeroDivisionError") as caught:
        pretrainer.collect_files(default_source=_source(tmp_path), internal_ddp_handling=True)
    assert caught.value.key == "encoder"


@pytest.mark.parametrize("text, loaded", [("False", False), ("false", False), ("0", False), ("True", True)])
def test_a_condition_given_as_a_string_counts_by_its_meaning(tmp_path, text, loaded):
    encoder = module(2)
    pretrainer = Pretrainer(tmp_path / "c", {"encoder": encoder}, conditions={"encoder": text})
    paths = pretrainer.collect_files(default_source=_source(tmp_path))
    assert ("encoder" in paths) is loaded
    pretrainer.load_collected()
    assert (digest(encoder) == digest(module(1))) is loaded


def test_a_condition_string_of_no_meaning_is_an_error(tmp_path):
    pretrainer = Pretrainer(tmp_path / "c", {"encoder": module(2)}, conditions={"encoder": "maybe"})
    with pytest.raises(ConfigurationError, match="neither true nor false"):
        pretrainer.collect_files(default_source=_source(tmp_path))


# ------------------------------------------------------------------------------------------
# The launcher says several processes, but no process group
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variables",
    [
        {"WORLD_SIZE": " 2"},
        {"WORLD_SIZE": "2 "},
        {"OMPI_COMM_WORLD_SIZE": "4"},
        {"SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1"},
    ],
)
def test_a_launcher_without_a_process_group_is_a_clear_error(tmp_path, monkeypatch, variables):
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    pretrainer = Pretrainer(tmp_path / "c", {"encoder": module(2)})
    with pytest.raises(ConfigurationError, match="but torch.distributed is not initialised"):
        pretrainer.collect_files(default_source=_source(tmp_path), internal_ddp_handling=True)
    assert not (tmp_path / "c" / "encoder.ckpt").exists()


def test_a_slurm_batch_shell_is_one_process(tmp_path, monkeypatch):
    # sbatch -n 4 runs the script itself once: SLURM_NTASKS=4 there says nothing about this process.
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_STEP_ID", "batch")
    encoder = module(2)
    pretrainer = Pretrainer(tmp_path / "c", {"encoder": encoder})
    pretrainer.collect_files(default_source=_source(tmp_path), internal_ddp_handling=True)
    pretrainer.load_collected()
    assert digest(encoder) == digest(module(1))


# ------------------------------------------------------------------------------------------
# Who removes a bad file, which cause is shown, and which bytes each rank loads
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_only_the_rank_that_placed_a_file_removes_it(tmp_path):
    # SpeechBrain's pattern: rank 0 collects, every rank loads; the copy is damaged in between and
    # rank 1 loads first. Rank 1 must not delete rank 0's file: rank 0 then reports the checksum itself.
    source = _source(tmp_path, seed=4)
    pin = "sha256:" + __import__("hashlib").sha256((pathlib.Path(source) / "encoder.ckpt").read_bytes()).hexdigest()
    cell = {"collect_in": str(tmp_path / "c"), "source": source, "checksums": {"encoder": pin}}
    rank0, rank1 = assert_all_ok(run_ranks(rank_jobs.speechbrain_pattern, 2, args=(cell,)))
    assert rank1["error"] == "ChecksumError", rank1
    assert rank1["file_left"], "rank 1, which did not place the file, removed it"
    assert "left for the rank that placed it to remove" in rank1["text"]
    assert rank0["error"] == "ChecksumError", rank0  # not a "No such file"
    assert "the file was removed" in rank0["text"]
    assert not (tmp_path / "c" / "encoder.ckpt").exists()  # removed by rank 0, which placed it


@pytest.mark.slow
def test_the_root_cause_is_shown_first_with_the_other_ranks_causes(tmp_path):
    cell = {
        "collect_in": str(tmp_path / "c"),
        "source": _source(tmp_path),
        "hook_errors": {"0": "gone", "2": "checksum"},
    }
    outcomes = [r[0] for r in assert_all_ok(run_ranks(rank_jobs.collect_cells, 3, args=([cell],)))]
    assert len({o["text"] for o in outcomes}) == 1, outcomes
    for outcome in outcomes:
        assert outcome["error"] == "ChecksumError" and outcome["rank_in_error"] == 2, outcome
        text = outcome["text"]
        assert "Other ranks failed too: rank 0: TransferError:" in text and "No such file" in text, text


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["COPY", "SYMLINK"])
def test_two_jobs_two_revisions_one_folder_never_load_each_others_bytes(tmp_path, hub, strategy):
    import threading

    first, second = module(seed=51), module(seed=52)
    hub.add_file("org/m", "encoder.ckpt", ckpt_bytes(first), revision="v1")
    hub.add_file("org/m", "encoder.ckpt", ckpt_bytes(second), revision="v2")
    markers = tmp_path / "markers"
    markers.mkdir()
    collect_in = tmp_path / "shared"
    cell = {
        "collect_in": str(collect_in),
        "path": "org/m/encoder.ckpt",
        "revision": "v1",
        "strategy": strategy,
        "markers": str(markers),
    }
    box: dict = {}
    job_a = threading.Thread(target=lambda: box.update(results=run_ranks(rank_jobs.collect_then_wait, 2, args=(cell,))))
    job_a.start()
    try:
        deadline = time.monotonic() + 150
        while len(list(markers.glob("collected-*"))) < 2 and time.monotonic() < deadline and job_a.is_alive():
            time.sleep(0.1)
        assert len(list(markers.glob("collected-*"))) == 2, "job A never collected"
        # Job B collects the other revision into the same folder while job A's ranks are about to load.
        loaded_by_b = module(seed=7)
        from pl_pretrain import FetchConfig, LocalStrategy

        job_b = Pretrainer(collect_in, {"encoder": loaded_by_b}, paths={"encoder": "org/m/encoder.ckpt"})
        job_b.collect_files(local_strategy=LocalStrategy[strategy], fetch_config=FetchConfig(revision="v2"))
        job_b.load_collected()
        assert digest(loaded_by_b) == digest(second)
    finally:
        (markers / "go").write_text("")
        job_a.join(200)
    outcomes = assert_all_ok(box["results"])
    for rank, outcome in enumerate(outcomes):
        assert outcome["digest"] != digest(second), f"rank {rank} of job A loaded job B's revision"
        assert outcome["error"] == "FetchError", f"rank {rank}: {outcome}"
        text = outcome["text"]
        assert "is not the file that rank 0 collected for this job" in text and "revision v1" in text, text
        assert "rank 0 finds" in text  # every rank raises the same error: the lowest failing rank's


@pytest.mark.slow
@pytest.mark.skipif(not __import__("dist").can_unshare(), reason="simulated nodes need root for mount namespaces")
def test_per_node_false_on_unshared_folders_never_loads_a_stale_same_size_file(tmp_path):
    fresh, stale = module(seed=61), module(seed=62)
    assert len(ckpt_bytes(fresh)) == len(ckpt_bytes(stale))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "encoder.ckpt").write_bytes(ckpt_bytes(fresh))
    node_root = tmp_path / "node_local"
    cell = {"collect_in": str(node_root / "collect"), "source": str(tmp_path / "src"), "per_node": False}
    results = run_ranks(
        rank_jobs.stale_copy_on_node_one,
        4,
        args=(cell, ckpt_bytes(stale)),
        nodes=2,
        private=[str(node_root)],
        timeout=180,
    )
    outcomes = assert_all_ok(results)
    for rank, outcome in enumerate(outcomes):
        assert outcome["error"] == "PretrainerError", f"rank {rank} loaded: {outcome}"
        assert "Rank 2 cannot read the files that rank 0 collected" in outcome["text"]


# ------------------------------------------------------------------------------------------
# A waiting rank lost while the fetching rank downloads
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_waiting_rank_killed_mid_download_stops_the_download_and_ends_every_rank(tmp_path, http_server):
    # The download would take about 60 s; rank 2, which only waits, is killed -9 1 s into it.
    data = ckpt_bytes(module(seed=71))
    http_server.add("slow/encoder.ckpt", data)
    http_server.fail("slow/encoder.ckpt", Fault("slow", times=-1, delay=60.0 / (len(data) // 64 + 1), chunk=64))
    cell = {"collect_in": str(tmp_path / "c"), "source": f"{http_server.url}/slow", "strategy": "COPY"}
    results = run_ranks(
        rank_jobs.collect_while_a_waiting_rank_is_killed,
        3,
        args=(cell, 2, 1.0),
        pg_timeout_s=PG_TIMEOUT_S,
        timeout=150,
        check=False,
    )
    assert not results[2].ok  # killed, never reported
    for rank in (0, 1):
        assert results[rank].ok, f"rank {rank} did not end: {results[rank].error_type} {results[rank].error_text}"
        outcome = results[rank].value
        waited = outcome["raised_at"] - outcome["started"]
        print(f"[rank 2 killed mid-download] rank {rank} raised after {waited:.1f} s: {outcome['text'][:160]}")
        assert outcome["error"] == "PretrainerError", outcome
        assert "Rank 2 died or stopped" in outcome["text"] or "rank 2 died or stopped" in outcome["text"], outcome
        assert outcome["rank_in_error"] == 2, outcome
        # Noticed within the default group's timeout of the death, long before the download's end.
        assert waited < 1.0 + PG_TIMEOUT_S + SLACK_S, outcome
        assert not outcome["placed"] and outcome["temporary"] == [], outcome
    assert "Rank 2 died or stopped during the fetch" in results[0].value["text"]
    assert http_server.count("GET") == 1
    assert not (tmp_path / "c" / "encoder.ckpt").exists()
