"""URL downloads that resume, respect the server and stay bounded, and sharded checkpoints fetched at once.

The user collects an ``encoder`` from a loopback file server (tests/servers.py) that cuts the body,
asks to be left alone with ``Retry-After``, trickles one byte at a time or never ends its body;
what is asserted is what the server saw (``Range``/``If-Range`` headers, bytes served, when each
request arrived) and what the user gets (the weights, or one error naming what ran out, with
nothing placed). Then a six-shard checkpoint, by URL and from the Hub, collected with and without
a collection folder, its shards downloaded side by side.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ckpt_bytes, digest, module, same
from servers import Fault, FileServer
from test_faults import FAST, FILE, assert_nothing_trusted, collect, collect_fails

from pl_pretrain import FetchConfig, Pretrainer
from pl_pretrain.errors import ConfigurationError, FetchError
from pl_pretrain.fetching import RECORD_DIR


@pytest.fixture
def weights():
    mod = module(seed=7)
    return ckpt_bytes(mod), digest(mod)


def etag_of(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


# ------------------------------------------------------------------------------------------
# Resume: Range + If-Range after a cut body; a changed file or a server without ranges restarts
# ------------------------------------------------------------------------------------------


def test_url_cut_once_resumes_with_range_and_if_range(tmp_path, http_server, weights):
    data, expected = weights
    url = http_server.add("m/enc.ckpt", data)
    http_server.fail("enc.ckpt", Fault("drop", times=1))
    encoder, _ = collect(tmp_path / "c", url)
    assert digest(encoder) == expected
    first, second = http_server.gets("enc.ckpt")
    assert "range" not in first.headers and first.bytes_sent == len(data) // 2
    assert second.status == 206
    assert second.headers["range"] == f"bytes={len(data) // 2}-"
    assert second.headers["if-range"] == etag_of(data)
    served = sum(r.bytes_sent for r in http_server.gets("enc.ckpt"))
    assert served < 1.3 * len(data), f"{served} bytes served for a file of {len(data)}"
    assert (tmp_path / "c" / FILE).read_bytes() == data
    assert not list((tmp_path / "c" / RECORD_DIR).glob("*.partial*")), "the partial file is gone once placed"


def test_url_changed_since_the_partial_restarts_cleanly(tmp_path, http_server, weights):
    data, _ = weights
    url = http_server.add("m/enc.ckpt", data)
    http_server.fail("enc.ckpt", Fault("drop", times=1))
    # One try only: the cut ends the run, and the partial (with its validator) waits for the next.
    collect_fails(tmp_path / "c", url, FetchError, "failed 1 time", "the connection ended after", retries=0)
    partial = tmp_path / "c" / RECORD_DIR / f"{FILE}.partial"
    assert partial.stat().st_size == len(data) // 2

    # The file changes on the server: If-Range no longer matches, the server sends it whole (200).
    new = module(seed=8)
    http_server.add("m/enc.ckpt", ckpt_bytes(new))
    encoder, _ = collect(tmp_path / "c", url)
    assert same(encoder, new)
    last = http_server.gets("enc.ckpt")[-1]
    assert last.headers["if-range"] == etag_of(data) and last.status == 200
    assert (tmp_path / "c" / FILE).read_bytes() == ckpt_bytes(new)


def test_url_server_that_ignores_ranges_restarts_cleanly(tmp_path, weights):
    data, expected = weights
    with FileServer(ranges=False) as server:
        url = server.add("m/enc.ckpt", data)
        server.fail("enc.ckpt", Fault("drop", times=1))
        encoder, _ = collect(tmp_path / "c", url)
        assert digest(encoder) == expected
        assert all("range" not in r.headers for r in server.gets("enc.ckpt"))  # no Accept-Ranges: never asked
        assert server.gets("enc.ckpt")[-1].bytes_sent == len(data)


def test_url_partial_without_its_validator_is_never_continued(tmp_path, http_server, weights):
    data, expected = weights
    url = http_server.add("m/enc.ckpt", data)
    # A partial of the right name but no record of its validator (an older version, a hand copy).
    (tmp_path / "c" / RECORD_DIR).mkdir(parents=True)
    (tmp_path / "c" / RECORD_DIR / f"{FILE}.partial").write_bytes(b"\0" * 100)
    encoder, _ = collect(tmp_path / "c", url)
    assert digest(encoder) == expected
    assert "range" not in http_server.gets("enc.ckpt")[0].headers


@pytest.mark.slow
def test_url_killed_mid_download_resumes_on_the_next_run(tmp_path, http_server, weights):
    data, expected = weights
    url = http_server.add("m/encoder.ckpt", data)
    # about 30 s for the whole body: the kill lands while it is being sent
    http_server.fail("encoder.ckpt", Fault("slow", times=-1, delay=0.5, chunk=max(1, len(data) // 60)))
    collect_in = tmp_path / "c"
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps([{"path": url, "collect_in": str(collect_in), "strategy": "SYMLINK", "seed": 1}]))
    script = os.path.join(os.path.dirname(__file__), "scripts", "fault_child.py")
    child = subprocess.Popen(
        [sys.executable, script, str(spec), str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.PIPE,
    )
    try:
        # a process's start (torch, pl_pretrain) takes a minute and more on a loaded two-core machine
        deadline = time.monotonic() + 180
        while http_server.arrivals("GET", "encoder.ckpt") == 0 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.0)  # a few chunks in
        assert child.poll() is None, f"the job ended before it could be killed: {child.stderr.read().decode()}"
        assert http_server.arrivals("GET", "encoder.ckpt"), "the job did not reach the server within 180 s"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(30)
        child.stderr.close()
    cut = http_server.gets("encoder.ckpt")[0].bytes_sent
    assert 0 < cut < len(data)
    assert_nothing_trusted(collect_in, "encoder.ckpt")

    http_server.faults.clear()
    encoder = module(seed=2)
    pt = Pretrainer(collect_in, {"encoder": encoder}, paths={"encoder": url})
    pt.collect_files(fetch_config=FetchConfig(**FAST))
    pt.load_collected()
    assert digest(encoder) == expected
    rerun = http_server.gets("encoder.ckpt")[-1]
    held = int(rerun.headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < held <= cut and rerun.status == 206
    served = sum(r.bytes_sent for r in http_server.gets("encoder.ckpt"))
    assert served < 1.3 * len(data)


# ------------------------------------------------------------------------------------------
# Retry-After on 429 and 503: honoured, capped, and said in the log
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("status, form", [(429, "seconds"), (503, "seconds"), (503, "date")])
def test_url_retry_after_is_honoured(tmp_path, http_server, weights, caplog, status, form):
    data, expected = weights
    url = http_server.add("m/enc.ckpt", data)
    # An HTTP date has whole seconds: 2 s ahead is at least 1 s ahead when it is read.
    value = "1" if form == "seconds" else email.utils.formatdate(time.time() + 2, usegmt=True)
    http_server.fail("enc.ckpt", Fault("status", times=1, status=status, retry_after=value))
    with caplog.at_level(logging.WARNING, logger="pl_pretrain"):
        encoder, _ = collect(tmp_path / "c", url)  # backoff 0.01 s: the wait is the server's
    assert digest(encoder) == expected
    first, second = http_server.times("GET", "enc.ckpt")
    assert second - first >= 0.9, f"the retry came {second - first:.2f} s after the {status}"
    assert "as the server's Retry-After asks" in caplog.text, caplog.text
    assert f"HTTP {status}" in caplog.text


def test_url_retry_after_is_capped_by_max_retry_wait(tmp_path, http_server, weights, caplog):
    data, expected = weights
    url = http_server.add("m/enc.ckpt", data)
    http_server.fail("enc.ckpt", Fault("status", times=1, status=429, retry_after="3600"))
    with caplog.at_level(logging.WARNING, logger="pl_pretrain"):
        encoder, _ = collect(tmp_path / "c", url, max_retry_wait=0.2)
    assert digest(encoder) == expected
    first, second = http_server.times("GET", "enc.ckpt")
    assert second - first < 3.0
    assert "retrying in 0.2 s" in caplog.text and "capped by FetchConfig(max_retry_wait=0.2)" in caplog.text


def test_url_retry_after_longer_than_the_time_left_ends_at_once(tmp_path, http_server, weights):
    url = http_server.add("m/enc.ckpt", weights[0])
    http_server.fail("enc.ckpt", Fault("status", times=-1, status=503, retry_after="30"))
    start = time.monotonic()
    collect_fails(
        tmp_path / "c", url, FetchError, "ran out of time", "max_time=2", "next try would start in 30 s", max_time=2
    )
    assert time.monotonic() - start < 2.0
    assert http_server.arrivals("GET", "enc.ckpt") == 1


# ------------------------------------------------------------------------------------------
# Bounds: a trickle and an endless body end within their bound, nothing placed
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_url_trickle_ends_at_max_time(tmp_path, http_server, weights):
    url = http_server.add("m/enc.ckpt", weights[0])
    http_server.fail("enc.ckpt", Fault("slow", times=-1, delay=0.5, chunk=1))  # 1 byte per 0.5 s
    start = time.monotonic()
    collect_fails(
        tmp_path / "c", url, FetchError, "ran out of time", "FetchConfig(max_time=1.5) bounds one file", max_time=1.5
    )
    took = time.monotonic() - start
    assert took < 1.5 + 1.0, f"took {took:.1f} s for a bound of 1.5 s"
    assert http_server.arrivals("GET", "enc.ckpt") == 1


@pytest.mark.slow
def test_url_stall_within_a_read_ends_at_max_time_not_at_timeout(tmp_path, http_server, weights):
    url = http_server.add("m/enc.ckpt", weights[0])
    http_server.fail("enc.ckpt", Fault("slow", times=-1, delay=30.0, chunk=len(weights[0])))  # headers, then silence
    start = time.monotonic()
    collect_fails(tmp_path / "c", url, FetchError, "ran out of time", max_time=1.0, timeout=20.0)
    assert time.monotonic() - start < 2.5


@pytest.mark.parametrize("bound", ["max_bytes", "max_time"])
def test_url_endless_body_ends_at_its_bound(tmp_path, http_server, weights, bound):
    url = http_server.add("m/enc.ckpt", weights[0])
    http_server.fail("enc.ckpt", Fault("endless", times=-1, delay=0.001, chunk=64 * 1024))  # no Content-Length
    limits = {"max_bytes": {"max_bytes": 2 * 1024 * 1024}, "max_time": {"max_time": 1.0}}[bound]
    cause = "FetchConfig(max_bytes=2097152)" if bound == "max_bytes" else "FetchConfig(max_time=1)"
    start = time.monotonic()
    collect_fails(tmp_path / "c", url, FetchError, cause, **limits)
    assert time.monotonic() - start < 5.0
    # No validator for a body of unknown length that was cut by us: nothing is kept to resume.
    assert not list((tmp_path / "c" / RECORD_DIR).glob("*.partial*"))


def test_url_announcing_more_than_max_bytes_is_refused(tmp_path, http_server, weights):
    data = weights[0]
    url = http_server.add("m/enc.ckpt", data)
    collect_fails(tmp_path / "c", url, FetchError, f"announces {len(data)} bytes", "max_bytes=100", max_bytes=100)
    assert http_server.arrivals("GET", "enc.ckpt") == 1  # not retried
    assert not list((tmp_path / "c" / RECORD_DIR).glob("*.partial*"))


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_time", 0),
        ("max_time", float("nan")),
        ("max_bytes", -1),
        ("max_bytes", 1.5),
        ("max_retry_wait", -1),
        ("parallel_shards", 0),
        ("parallel_shards", "8"),
    ],
)
def test_bad_download_bounds_are_configuration_errors(field, value):
    with pytest.raises(ConfigurationError, match=rf"FetchConfig\({field}=.*\) is not valid: {field} must be"):
        FetchConfig(**{field: value})


# ------------------------------------------------------------------------------------------
# Sharded checkpoints: shards fetched side by side, by URL and from the Hub
# ------------------------------------------------------------------------------------------


class Wide(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(6))


def six_shards(tmp_path):
    """Saves a model as a six-shard safetensors checkpoint; returns (the model, {file name: bytes})."""
    import huggingface_hub

    source = Wide(seed=1)
    folder = tmp_path / "published"
    folder.mkdir()
    huggingface_hub.save_torch_state_dict(source.state_dict(), folder, max_shard_size=1200)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert len(files) == 7, sorted(files)  # the index and six shards
    return source, files


def publish_slowly(server, files: dict[str, bytes], delay: float, prefix: str = "m/") -> None:
    """Publishes the checkpoint; each shard's first download takes two `delay`s, so that
    downloads one by one never overlap and downloads at once always do."""
    for name, data in files.items():
        if hasattr(server, "add_file"):
            server.add_file("org/wide", name, data)
        else:
            server.add(prefix + name, data)
        if name.endswith(".safetensors"):
            server.fail(name, Fault("slow", times=1, delay=delay, chunk=max(1, len(data) // 2)))


@pytest.mark.parametrize("collect_in", ["set", "None"])
@pytest.mark.parametrize("kind", ["url", "hub"])
def test_sharded_checkpoint_is_fetched_concurrently_and_loads(tmp_path, http_server, hub, kind, collect_in):
    source, files = six_shards(tmp_path)
    server = http_server if kind == "url" else hub
    publish_slowly(server, files, delay=0.3)
    index = f"{http_server.url}/m/" if kind == "url" else "org/wide/"
    target = Wide(seed=2)
    folder = tmp_path / "c" if collect_in == "set" else None
    pt = Pretrainer(folder, {"model": target}, paths={"model": index + "model.safetensors.index.json"})
    pt.collect_files(fetch_config=FetchConfig(**FAST))
    report = pt.load_collected()["model"]
    assert same(source, target) and report.complete and report.format == "sharded-safetensors"
    assert server.most_active >= 2, "the shards were downloaded one by one"
    assert all(len(server.gets(name)) == 1 for name in files if name.endswith(".safetensors"))


def test_sharded_url_checkpoint_one_by_one_with_parallel_shards_1(tmp_path, http_server):
    source, files = six_shards(tmp_path)
    publish_slowly(http_server, files, delay=0.05)
    target = Wide(seed=2)
    pt = Pretrainer(
        tmp_path / "c", {"model": target}, paths={"model": f"{http_server.url}/m/model.safetensors.index.json"}
    )
    pt.collect_files(fetch_config=FetchConfig(**FAST, parallel_shards=1))
    pt.load_collected()
    assert same(source, target)
    assert http_server.most_active == 1


def test_sharded_url_checkpoint_with_a_missing_shard_names_it(tmp_path, http_server):
    _, files = six_shards(tmp_path)
    missing = sorted(name for name in files if name.endswith(".safetensors"))[2]
    for name, data in files.items():
        if name != missing:
            http_server.add(f"m/{name}", data)
    pt = Pretrainer(
        tmp_path / "c", {"model": Wide(seed=2)}, paths={"model": f"{http_server.url}/m/model.safetensors.index.json"}
    )
    with pytest.raises(FetchError, match=rf"HTTP 404 Not Found for .*/m/{missing}") as info:
        pt.collect_files(fetch_config=FetchConfig(**FAST))
    assert info.value.key == "model"
    assert not (tmp_path / "c" / "model.shards" / missing).exists()
