"""Faults that need other processes: kill -9 mid-download, two torchrun jobs on one folder, a full
disk, and HF_HUB_OFFLINE=1 (which huggingface_hub reads when it is imported).

The jobs are real processes (tests/scripts/fault_child.py, tests/scripts/torchrun_collect.py)
that reach the loopback servers of this test process; every wait is bounded. docs/faults.md
tabulates these cases with those of test_faults.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from dist import can_unshare
from helpers import ckpt_bytes, digest, module
from servers import Fault
from test_faults import assert_nothing_trusted

from pl_pretrain import FetchConfig, LocalStrategy, Pretrainer
from pl_pretrain.fetching import RECORD_DIR

# Every test here starts other processes (ranks, launchers): not in the fast loop.
pytestmark = pytest.mark.slow

SCRIPTS = pathlib.Path(__file__).parent / "scripts"
FAST = {"retries": 1, "backoff": 0.01, "timeout": 10.0}

needs_root = pytest.mark.skipif(not can_unshare(), reason="a private tmpfs (unshare -m + mount) needs root on Linux")


def child_env(**extra: str) -> dict[str, str]:
    """The test process's environment (HF_ENDPOINT, HF_HUB_CACHE, PYTHONPATH...), for a child job."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run_child(tmp_path, cases, *, env=None, prefix=(), timeout=120) -> list[dict]:
    """Runs tests/scripts/fault_child.py on `cases`; returns its outcomes."""
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps(cases))
    command = [*prefix, sys.executable, str(SCRIPTS / "fault_child.py"), str(spec), str(out)]
    done = subprocess.run(command, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 and out.exists(), f"child failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return json.loads(out.read_text())


def published(seed: int, dim: int = 8) -> tuple[bytes, str]:
    mod = module(seed=seed, dim=dim)
    return ckpt_bytes(mod), digest(mod)


# ------------------------------------------------------------------------------------------
# kill -9 in the middle of a download, then the job again
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, strategy", [("url", "SYMLINK"), ("hub", "SYMLINK"), ("hub", "COPY_SKIP_CACHE")])
def test_killed_mid_download_leaves_nothing_trusted_and_the_rerun_loads(tmp_path, http_server, hub, kind, strategy):
    data, expected = published(seed=21)
    if kind == "url":
        path = http_server.add("m/encoder.ckpt", data)
        server = http_server
    else:
        hub.add_file("org/asr", "encoder.ckpt", data)
        path, server = "org/asr/encoder.ckpt", hub
    # about 30 s for the whole body: the kill always lands while it is being sent
    server.fail("encoder.ckpt", Fault("slow", times=-1, delay=0.5, chunk=max(1, len(data) // 60)))
    collect_in = tmp_path / "c"
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps([{"path": path, "collect_in": str(collect_in), "strategy": strategy, "seed": 1}]))
    child = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "fault_child.py"), str(spec), str(out)],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180  # a process start takes a minute and more on a loaded two-core machine
        while server.arrivals("GET", "encoder.ckpt") == 0 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # a few chunks in
        assert child.poll() is None, f"the job ended before it could be killed: {child.stderr.read().decode()}"
        assert server.arrivals("GET", "encoder.ckpt") == 1, "the download did not start"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(30)
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    # The server logs each request when it arrives and counts the bytes as it sends them.
    cut = server.gets("encoder.ckpt")
    assert cut and cut[0].bytes_sent < len(data), "the download was not cut short"

    # What the killed job left: nothing that a later run would load (temporary files at most).
    assert_nothing_trusted(collect_in, tmp_allowed=True)

    server.faults.clear()
    encoder = module(seed=2)
    pt = Pretrainer(collect_in, {"encoder": encoder}, paths={"encoder": path})
    pt.collect_files(local_strategy=LocalStrategy[strategy], fetch_config=FetchConfig(**FAST))
    pt.load_collected()
    assert digest(encoder) == expected
    assert server.arrivals("GET", "encoder.ckpt") == 2  # downloaded again (the Hub resumes with a Range)
    assert (collect_in / "encoder.ckpt").read_bytes() == data
    assert not list(collect_in.glob(".*.tmp")), "the rerun cleans the killed job's temporary files"
    assert not list((collect_in / RECORD_DIR).glob("hub-*"))


# ------------------------------------------------------------------------------------------
# Two torchrun jobs collecting into one folder at the same moment
# ------------------------------------------------------------------------------------------


def test_two_torchrun_jobs_collect_into_one_folder(tmp_path, http_server, hub):
    enc, enc_digest = published(seed=31)
    dec, dec_digest = published(seed=32)
    url = http_server.add("m/encoder.ckpt", enc)
    hub.add_file("org/asr", "decoder.ckpt", dec)
    # slow enough (about 1.5 s each) that the second job's fetcher meets the first one's lock
    http_server.fail("encoder.ckpt", Fault("slow", times=-1, delay=0.15, chunk=max(1, len(enc) // 10)))
    hub.fail("decoder.ckpt", Fault("slow", times=-1, delay=0.15, chunk=max(1, len(dec) // 10)))
    collect_in = tmp_path / "shared"
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "collect_in": str(collect_in),
                "paths": {"encoder": url, "decoder": "org/asr/decoder.ckpt"},
                "strategy": "COPY",
                "fetch_config": FAST,
                "start_together": str(tmp_path / "started"),
                "jobs": 2,
            }
        )
    )
    out = tmp_path / "out"
    out.mkdir()
    jobs = {}
    for tag in ("job-a", "job-b"):
        log = open(tmp_path / f"{tag}.log", "w")  # noqa: SIM115 (closed once the job ends, below)
        command = [
            "timeout",
            "-k",
            "5",
            "150",
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(SCRIPTS / "torchrun_collect.py"),
            str(spec),
            str(out),
            tag,
        ]
        jobs[tag] = (subprocess.Popen(command, env=child_env(), stdout=log, stderr=subprocess.STDOUT), log)
    for tag, (proc, log) in jobs.items():
        try:
            proc.wait(170)
        finally:
            proc.kill()
            log.close()
        assert proc.returncode == 0, f"{tag} failed:\n{(tmp_path / f'{tag}.log').read_text()[-4000:]}"

    outcomes = {f.stem: json.loads(f.read_text()) for f in out.glob("*.json")}
    assert sorted(outcomes) == ["job-a-rank0", "job-a-rank1", "job-b-rank0", "job-b-rank1"]
    for name, outcome in outcomes.items():
        assert outcome["error"] is None, f"{name}: {outcome['text']}"
        assert outcome["digests"] == {"encoder": enc_digest, "decoder": dec_digest}, name
    # both jobs were collecting at the same time...
    a, b = outcomes["job-a-rank0"], outcomes["job-b-rank0"]
    assert max(a["started"], b["started"]) < min(a["finished"], b["finished"])
    # ...yet each file was downloaded once, and is whole
    assert http_server.arrivals("GET", "encoder.ckpt") == 1
    assert hub.arrivals("GET", "decoder.ckpt") == 1
    assert (collect_in / "encoder.ckpt").read_bytes() == enc
    assert (collect_in / "decoder.ckpt").read_bytes() == dec
    assert not list(collect_in.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------
# A disk that fills up: a 64 KiB tmpfs, private to the child (unshare -m)
# ------------------------------------------------------------------------------------------


@needs_root
def test_disk_full_is_a_clear_error_and_leaves_no_partial_file(tmp_path, http_server, hub):
    big = os.urandom(256 * 1024)
    url = http_server.add("m/big.ckpt", big)
    hub.add_file("org/big", "big.ckpt", big)
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.ckpt").write_bytes(big)
    small, small_digest = published(seed=12345)
    small_url = http_server.add("m/small.ckpt", small)
    disk = tmp_path / "tiny"
    disk.mkdir()
    failing = {
        "url": (url, "COPY", f"{http_server.url}/m"),
        "hub_skip_cache": ("org/big/big.ckpt", "COPY_SKIP_CACHE", "org/big"),
        "hub_copy": ("org/big/big.ckpt", "COPY", "org/big"),
        "local_copy": (str(src / "big.ckpt"), "COPY", str(src)),
    }
    cases = [
        {"key": key, "path": path, "strategy": strategy, "collect_in": str(disk), "fetch_config": FAST}
        for key, (path, strategy, _) in failing.items()
    ]
    cases.append({"key": "small", "path": small_url, "strategy": "COPY", "collect_in": str(disk), "seed": 1})
    mount = 'mount --make-rprivate / && mount -t tmpfs -o size=64k tmpfs "$1" && shift && exec "$@"'
    outcomes = run_child(tmp_path, cases, prefix=["unshare", "-m", "sh", "-c", mount, "sh", str(disk)])
    for outcome, (key, (_, _, source)) in zip(outcomes, failing.items(), strict=False):
        assert outcome["error"] == "FetchError" and outcome["value_error"], outcome
        assert outcome["error_key"] == key and outcome["source"] == source, outcome
        text = outcome["text"]
        assert f"loadable '{key}'" in text and f"source '{source}'" in text and "No space left on device" in text, text
        # nothing half-written: no file, no temporary file, no scratch Hub cache
        names = outcome["listing"]
        assert not [n for n in names if n.startswith(key) or n.endswith(".tmp") or "/hub-" in n], names
    # the failed downloads gave their space back: a small file still fits, and loads
    last = outcomes[-1]
    assert last["error"] is None, last
    assert last["digest"] == small_digest
    assert list(disk.iterdir()) == []  # the tmpfs was the child's alone


# ------------------------------------------------------------------------------------------
# HF_HUB_OFFLINE=1 (read by huggingface_hub at import: a child process)
# ------------------------------------------------------------------------------------------


def test_hf_hub_offline_uses_what_is_there_and_touches_no_network(tmp_path, http_server, hub):
    data, expected = published(seed=41)
    url = http_server.add("m/encoder.ckpt", data)
    hub.add_file("org/asr", "encoder.ckpt", data)
    for collect_in, path in [(tmp_path / "url-collected", url), (tmp_path / "hub-first", "org/asr/encoder.ckpt")]:
        Pretrainer(collect_in, {"encoder": module(seed=3)}, paths={"encoder": path}).collect_files()
    http_server.reset_log()
    hub.reset_log()
    cases = [
        {"path": url, "collect_in": str(tmp_path / "url-collected")},  # collected before: used
        {"path": "org/asr/encoder.ckpt", "collect_in": str(tmp_path / "hub-second")},  # in the Hub cache: used
        {"path": "org/asr/encoder.ckpt", "collect_in": None},  # loaded from the Hub cache
        {"path": url, "collect_in": str(tmp_path / "url-fresh")},  # never collected: offline error
        {"path": "org/asr/missing.ckpt", "collect_in": str(tmp_path / "hub-missing")},  # not cached: offline error
    ]
    outcomes = run_child(tmp_path, cases, env=child_env(HF_HUB_OFFLINE="1"))
    for outcome in outcomes[:3]:
        assert outcome["error"] is None and outcome["digest"] == expected, outcome
    for outcome, source in zip(outcomes[3:], [f"{http_server.url}/m", "org/asr"], strict=False):
        assert outcome["error"] == "OfflineError" and outcome["value_error"], outcome
        text = outcome["text"]
        assert "loadable 'encoder'" in text and f"source '{source}'" in text, text
        assert "offline" in text and "HF_HUB_OFFLINE=1" in text, text
        assert not [n for n in outcome["listing"] if not n.startswith(RECORD_DIR)], outcome["listing"]
    assert http_server.arrived == [] and hub.arrived == []  # nothing touched the network
