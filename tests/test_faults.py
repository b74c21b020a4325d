"""Fetching that survives faults and bad input, against servers on 127.0.0.1 that misbehave on purpose.

Each test tells one fault's story through the user's API: a Pretrainer collecting an ``encoder``
from a server that drops the connection, answers 500, sends fewer bytes than it announced,
stalls, refuses (401/404), lies about a file's digest; a corrupt file under a pinned checksum; a
bad key; a filesystem that refuses links. Every failure is asserted the same way: the error's
type, that its text names the key, the source and the cause, and that nothing a later run would
trust is left in the collection folder. The cases that need other processes (kill -9, two
torchrun jobs, a full disk, HF_HUB_OFFLINE) are in test_faults_processes.py; docs/faults.md
tabulates both.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import pathlib
import traceback
import warnings

import pytest
import rank_jobs
from dist import assert_all_ok, run_ranks
from helpers import ckpt_bytes, digest, module
from servers import Fault

from pl_pretrain import FetchConfig, LocalStrategy, Pretrainer, PretrainerError, fetch
from pl_pretrain.errors import ChecksumError, ConfigurationError, FetchError, OfflineError
from pl_pretrain.fetching import RECORD_DIR, placement
from pl_pretrain.fetching import http as http_kind

# Short backoff keeps the retry tests fast; the counts, not the delays, are what is asserted.
FAST = {"retries": 2, "backoff": 0.01, "timeout": 5.0}
KEY = "encoder"
FILE = KEY + ".ckpt"


# ------------------------------------------------------------------------------------------
# The user's story, and what every failure must look like
# ------------------------------------------------------------------------------------------


def collect(collect_in, path, *, checksum=None, strategy=LocalStrategy.SYMLINK, **config):
    """Collects and loads the encoder from `path`; returns (the module, the pretrainer)."""
    encoder = module(seed=99)
    pt = Pretrainer(
        collect_in,
        {KEY: encoder},
        paths={KEY: path},
        checksums={KEY: checksum} if checksum else None,
    )
    pt.collect_files(local_strategy=strategy, fetch_config=FetchConfig(**{**FAST, **config}))
    pt.load_collected()
    return encoder, pt


def collect_fails(collect_in, path, error_type, *causes, source=None, **kwargs):
    """Asserts that collecting fails with `error_type` naming the key, the source and every cause."""
    with pytest.raises(error_type) as info:
        collect(collect_in, path, **kwargs)
    error = info.value
    assert isinstance(error, ValueError) and isinstance(error, PretrainerError)
    text = str(error)
    assert error.key == KEY and f"loadable '{KEY}'" in text, text
    if source is not None:
        assert error.source == source and source in text, text
    for cause in causes:
        assert cause in text, f"{cause!r} not in: {text}"
    assert_nothing_trusted(pathlib.Path(collect_in))
    return error


def assert_nothing_trusted(folder: pathlib.Path, name: str = FILE, *, tmp_allowed: bool = False) -> None:
    """No file a later run would load: no file or link at the destination, no record vouching for
    one (a record that only says "placing" vouches for nothing), and no temporary file unless
    `tmp_allowed` (a killed process leaves them; the next run removes them under its lock)."""
    dst = folder / name
    assert not dst.exists() and not dst.is_symlink(), f"{dst} remains"
    leftovers = [p.name for p in folder.iterdir() if p.name != RECORD_DIR] if folder.exists() else []
    if tmp_allowed:
        assert all(n.startswith(f".{name}.") and n.endswith(".tmp") for n in leftovers), leftovers
    else:
        assert not list(folder.glob(".*.tmp")), leftovers
    record = folder / RECORD_DIR / f"{name}.json"
    if record.exists():
        assert json.loads(record.read_text()) == {"placing": True}, record.read_text()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def weights():
    """A checkpoint: (its bytes, the fingerprint of the module it loads into)."""
    mod = module(seed=7)
    return ckpt_bytes(mod), digest(mod)


# ------------------------------------------------------------------------------------------
# URLs: transient failures are retried, then reported with the last cause
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["drop", "status", "short"])
def test_url_transient_failure_once_is_retried(tmp_path, http_server, weights, fault):
    data, expected = weights
    url = http_server.add("m/enc.ckpt", data)
    http_server.fail("enc.ckpt", Fault(fault, times=1, status=500))
    encoder, _ = collect(tmp_path / "c", url)
    assert digest(encoder) == expected
    assert http_server.arrivals("GET", "enc.ckpt") == 2  # the failed attempt, then the good one
    assert (tmp_path / "c" / FILE).read_bytes() == data
    assert not list((tmp_path / "c").glob(".*.tmp"))


@pytest.mark.parametrize(
    "fault, cause",
    [
        (Fault("status", times=-1, status=500), "last cause: HTTP 500"),
        (Fault("status", times=-1, status=503), "last cause: HTTP 503"),
        (Fault("drop", times=-1), "last cause: the connection ended after"),
        (Fault("short", times=-1), "bytes announced by Content-Length"),
    ],
    ids=["500", "503", "drop", "short"],
)
def test_url_failing_every_time_is_reported_after_the_retries(tmp_path, http_server, weights, fault, cause):
    url = http_server.add("m/enc.ckpt", weights[0])
    http_server.fail("enc.ckpt", fault)
    collect_fails(tmp_path / "c", url, FetchError, "failed 3 times", cause, url, source=f"{http_server.url}/m")
    assert http_server.arrivals("GET", "enc.ckpt") == FAST["retries"] + 1


@pytest.mark.parametrize("status", [404, 401, 403])
def test_url_4xx_is_not_retried(tmp_path, http_server, weights, status):
    url = http_server.add("m/enc.ckpt", weights[0])
    if status != 404:
        http_server.fail("enc.ckpt", Fault("status", times=-1, status=status))
    else:
        url = f"{http_server.url}/m/missing.ckpt"
    collect_fails(tmp_path / "c", url, FetchError, f"HTTP {status}", url, source=f"{http_server.url}/m")
    assert http_server.arrivals("GET") == 1


@pytest.mark.slow
def test_url_that_stalls_times_out_after_the_retries(tmp_path, http_server, weights):
    data = weights[0]
    url = http_server.add("m/enc.ckpt", data)
    # headers at once, then one second of silence before the body: longer than the timeout
    http_server.fail("enc.ckpt", Fault("slow", times=-1, delay=1.0, chunk=len(data)))
    collect_fails(
        tmp_path / "c",
        url,
        FetchError,
        "failed 2 times",
        "timed out",
        "FetchConfig(timeout=...)",
        source=f"{http_server.url}/m",
        retries=1,
        timeout=0.2,
    )
    assert http_server.arrivals("GET", "enc.ckpt") == 2


@pytest.mark.slow
def test_url_slow_but_steady_download_succeeds(tmp_path, http_server, weights):
    data, expected = weights
    url = http_server.add("m/enc.ckpt", data)
    # a chunk every 0.05 s: the whole takes longer than the timeout, no single silence does
    chunk = max(1, len(data) // 12)
    http_server.fail("enc.ckpt", Fault("slow", times=-1, delay=0.05, chunk=chunk))
    encoder, _ = collect(tmp_path / "c", url, timeout=0.4)
    assert digest(encoder) == expected
    assert http_server.arrivals("GET", "enc.ckpt") == 1


# ------------------------------------------------------------------------------------------
# The Hub (through huggingface_hub): 401/404 once, 5xx retried, ETags verified
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["401-private", "401-unknown-repo", "404-file"])
def test_hub_401_and_404_are_not_retried(tmp_path, hub, weights, case):
    hub.add_file("org/asr", "enc.ckpt", weights[0])
    hub.add_file("org/private", "enc.ckpt", weights[0], token="hf_right_token")
    repo, name, cause = {
        "401-private": ("org/private", "enc.ckpt", "HTTP 401"),
        "401-unknown-repo": ("org/nothing", "enc.ckpt", "HTTP 401"),
        "404-file": ("org/asr", "dec.ckpt", "(404)"),
    }[case]
    collect_fails(tmp_path / "c", f"{repo}/{name}", FetchError, cause, name, source=repo, token="hf_wrong_token")
    assert len(hub.arrived) == 1, hub.arrived


def test_hub_500_then_200_is_retried(tmp_path, hub, weights):
    data, expected = weights
    hub.add_file("org/asr", "enc.ckpt", data)
    hub.fail("enc.ckpt", Fault("status", times=1, status=500))
    encoder, _ = collect(tmp_path / "c", "org/asr/enc.ckpt")
    assert digest(encoder) == expected
    assert hub.arrivals("GET", "enc.ckpt") == 2


def test_hub_failing_every_time_is_reported_after_the_retries(tmp_path, hub, weights):
    hub.add_file("org/asr", "enc.ckpt", weights[0])
    hub.fail("enc.ckpt", Fault("status", times=-1, status=502))
    collect_fails(
        tmp_path / "c",
        "org/asr/enc.ckpt",
        FetchError,
        "failed 3 times",
        "last cause: HTTP 502",
        "enc.ckpt",
        source="org/asr",
    )
    assert hub.arrivals("GET", "enc.ckpt") == FAST["retries"] + 1
    blobs = [p.name for p in pathlib.Path(os.environ["HF_HUB_CACHE"]).rglob("blobs/*")]
    assert all(name.endswith(".incomplete") for name in blobs), blobs  # nothing huggingface_hub would serve


@pytest.mark.parametrize("fault", ["drop", "short"])
def test_hub_connection_lost_half_way_is_resumed(tmp_path, hub, weights, fault):
    # huggingface_hub resumes with a Range request; the file arrives whole.
    data, expected = weights
    hub.add_file("org/asr", "enc.ckpt", data)
    hub.fail("enc.ckpt", Fault(fault, times=1))
    encoder, pt = collect(tmp_path / "c", "org/asr/enc.ckpt")
    assert digest(encoder) == expected
    assert pt.collected[KEY].sha256 == sha(data)  # checked against the ETag
    assert hub.arrivals("GET", "enc.ckpt") == 2


@pytest.mark.parametrize("strategy", [LocalStrategy.SYMLINK, LocalStrategy.COPY, LocalStrategy.COPY_SKIP_CACHE])
def test_hub_etag_mismatch_is_a_checksum_error(tmp_path, hub, weights, strategy):
    data = weights[0]
    hub.add_file("org/asr", "enc.ckpt", data)
    claimed = sha(b"the bytes the hub says it has")
    hub.lying_etags["enc.ckpt"] = claimed
    collect_fails(
        tmp_path / "c",
        "org/asr/enc.ckpt",
        ChecksumError,
        claimed,
        sha(data),
        "ETag",
        "hub:org/asr@",
        source="org/asr",
        strategy=strategy,
    )
    blobs = [p for p in pathlib.Path(os.environ["HF_HUB_CACHE"]).rglob("*") if p.is_file() and p.parent.name == "blobs"]
    assert blobs == []  # the bad blob is gone from the cache too: the next fetch downloads again
    assert not list(pathlib.Path(os.environ["HF_HUB_CACHE"]).rglob("snapshots/*/enc.ckpt"))
    hub.lying_etags.clear()
    encoder, _ = collect(tmp_path / "c", "org/asr/enc.ckpt", strategy=strategy)
    assert digest(encoder) == weights[1]


# ------------------------------------------------------------------------------------------
# Pinned checksums
# ------------------------------------------------------------------------------------------


@pytest.fixture
def published(tmp_path, http_server, hub, weights):
    """The same checkpoint at a local folder, a URL and the Hub: kind -> (path, source)."""
    data = weights[0]
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "enc.ckpt").write_bytes(data)
    hub.add_file("org/asr", "enc.ckpt", data)
    url = http_server.add("m/enc.ckpt", data)
    return {
        "local": (str(folder / "enc.ckpt"), str(folder)),
        "url": (url, f"{http_server.url}/m"),
        "hub": ("org/asr/enc.ckpt", "org/asr"),
    }


@pytest.mark.parametrize("strategy", [LocalStrategy.SYMLINK, LocalStrategy.COPY])
@pytest.mark.parametrize("kind", ["local", "url", "hub"])
def test_pinned_checksum_mismatch_removes_the_bad_file(tmp_path, published, weights, kind, strategy):
    path, source = published[kind]
    pinned = sha(b"what the user expected")
    collect_fails(
        tmp_path / "c",
        path,
        ChecksumError,
        f"sha256 {pinned} was expected",
        f"has sha256 {sha(weights[0])}",
        "the file was removed",
        source=source,
        checksum=f"sha256:{pinned}",
        strategy=strategy,
    )
    if kind == "local":  # the user's own file is never touched
        assert (tmp_path / "src" / "enc.ckpt").read_bytes() == weights[0]
    # the right checksum loads
    encoder, pt = collect(tmp_path / "c", path, checksum=f"sha256:{sha(weights[0])}", strategy=strategy)
    assert digest(encoder) == weights[1]
    assert pt.provenance()[KEY]["sha256"] == sha(weights[0])


def test_collected_file_changed_before_load_is_caught(tmp_path, published, weights):
    path, source = published["url"]
    pt = Pretrainer(
        tmp_path / "c", {KEY: module(seed=1)}, paths={KEY: path}, checksums={KEY: f"sha256:{sha(weights[0])}"}
    )
    pt.collect_files(fetch_config=FetchConfig(**FAST))
    (tmp_path / "c" / FILE).write_bytes(b"rewritten by someone else")
    with pytest.raises(ChecksumError) as info:
        pt.load_collected()
    text = str(info.value)
    assert info.value.key == KEY and f"loadable '{KEY}'" in text
    assert "changed after it was collected" in text
    assert sha(weights[0]) in text and sha(b"rewritten by someone else") in text
    assert_nothing_trusted(tmp_path / "c")


def test_collected_file_changed_between_runs_is_fetched_again(tmp_path, published, http_server, weights):
    path, _ = published["url"]
    pinned = f"sha256:{sha(weights[0])}"
    collect(tmp_path / "c", path, checksum=pinned)
    original = (tmp_path / "c" / FILE).read_bytes()
    rotten = original[:100] + bytes([original[100] ^ 0xFF]) + original[101:]  # same size, one byte flipped
    (tmp_path / "c" / FILE).write_bytes(rotten)
    # A rewrite (even at the same size) changes the file's change time: the record no longer vouches
    # for it, and the next run fetches it again. (Rot that no write explains is caught by the re-hash
    # of a pinned file before loading: test_collected_file_changed_before_load_is_caught.)
    encoder, _ = collect(tmp_path / "c", path, checksum=pinned)
    assert digest(encoder) == weights[1]
    assert http_server.arrivals("GET", "enc.ckpt") == 2


# ------------------------------------------------------------------------------------------
# Dying at the worst moment (kill -9 of a real process is in test_faults_processes.py)
# ------------------------------------------------------------------------------------------


def test_death_between_rename_and_record_is_not_trusted(tmp_path, http_server, monkeypatch):
    old, new = ckpt_bytes(module(seed=1)), ckpt_bytes(module(seed=2))
    url_old, url_new = http_server.add("a/enc.ckpt", old), http_server.add("b/enc.ckpt", new)
    collect(tmp_path / "c", url_old)

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies right after the new file was renamed into place

    with monkeypatch.context() as patch:
        patch.setattr(http_kind, "_finish_placing", die)
        with pytest.raises(KeyboardInterrupt):
            collect(tmp_path / "c", url_new)
    assert (tmp_path / "c" / FILE).read_bytes() == new  # whole, but no record vouches for it
    assert_nothing_trusted_record(tmp_path / "c")
    # Asking for the old source again must not load the new bytes under the old record.
    encoder, _ = collect(tmp_path / "c", url_old)
    assert digest(encoder) == digest(module(seed=1))
    assert http_server.arrivals("GET", "a/enc.ckpt") == 2


def assert_nothing_trusted_record(folder: pathlib.Path, name: str = FILE) -> None:
    assert json.loads((folder / RECORD_DIR / f"{name}.json").read_text()) == {"placing": True}


# ------------------------------------------------------------------------------------------
# Offline (allow_network=False; HF_HUB_OFFLINE=1 is in test_faults_processes.py)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["url", "hub"])
def test_offline_missing_file_says_offline(tmp_path, published, http_server, hub, kind):
    path, source = published[kind]
    http_server.reset_log()
    hub.reset_log()
    collect_fails(tmp_path / "c", path, OfflineError, "offline", "network is off", source=source, allow_network=False)
    assert http_server.arrived == [] and hub.arrived == []


# ------------------------------------------------------------------------------------------
# Security: where files go, which sources are read, what is shown
# ------------------------------------------------------------------------------------------

BAD_KEYS = ["../x", "../../etc/x", "/tmp/abs", "a/b", "a\\b", "x\x00y", "", RECORD_DIR]
BAD_NAMES = BAD_KEYS + ["..", "."]  # as keys these are harmless: '...ckpt', '..ckpt'


@pytest.mark.parametrize("bad", BAD_KEYS, ids=repr)
def test_bad_key_is_rejected_before_anything_is_written(tmp_path, published, bad):
    collect_in = tmp_path / "deep" / "c"
    with pytest.raises(ConfigurationError) as info:
        Pretrainer(collect_in, {bad: module(seed=1)}, paths={bad: published["local"][0]})
    assert isinstance(info.value, ValueError)
    assert repr(bad) in str(info.value) and "not a plain file name" in str(info.value)
    pt = Pretrainer(collect_in, {"ok": module(seed=1)})
    with pytest.raises(ConfigurationError):
        pt.add_loadables({bad: module(seed=2)})
    assert not (tmp_path / "deep").exists()


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_bad_save_filename_is_rejected(tmp_path, published, bad):
    with pytest.raises(ConfigurationError, match="not a plain file name"):
        fetch("enc.ckpt", published["local"][1], tmp_path / "deep" / "c", save_filename=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("scheme", ["file:///etc/passwd", "ftp://127.0.0.1/enc.ckpt", "hdfs://cluster/enc.ckpt"])
def test_only_http_and_https_are_fetched(tmp_path, scheme):
    with pytest.raises(ConfigurationError) as info:
        collect(tmp_path / "c", scheme)
    assert info.value.key == KEY and "Only http:// and https://" in str(info.value)
    assert_nothing_trusted(tmp_path / "c")


def _everything_said(error: BaseException | None, caplog, pt: Pretrainer | None, folder: pathlib.Path) -> str:
    """Every text a user could see: the error with its whole chain, the logs, provenance, records."""
    parts = [caplog.text]
    if error is not None:
        parts += [str(error), repr(error), "".join(traceback.format_exception(error))]
    if pt is not None:
        parts.append(json.dumps(pt.provenance(), default=str))
    parts += [p.read_text(errors="replace") for p in folder.rglob("*.json")]
    return "\n".join(parts)


def test_hub_token_never_shown(tmp_path, hub, weights, caplog, monkeypatch):
    token = "hf_TOPSECRET_token_123"
    hub.add_file("org/private", "enc.ckpt", weights[0], token=token)
    hub.fail("flaky.ckpt", Fault("status", times=-1, status=500))
    hub.add_file("org/private", "flaky.ckpt", weights[0])
    caplog.set_level(logging.DEBUG)
    said = []
    for path, error_type, cfg in [
        ("org/private/enc.ckpt", FetchError, {"token": "hf_WRONG_secret_456"}),  # 401
        ("org/private/dec.ckpt", FetchError, {"token": token}),  # 404
        ("org/private/flaky.ckpt", FetchError, {"token": token}),  # 500, retried with warnings
    ]:
        with pytest.raises(error_type) as info:
            collect(tmp_path / "c", path, **cfg)
        said.append(_everything_said(info.value, caplog, None, tmp_path / "c"))
    monkeypatch.setenv("HF_TOKEN", token)  # token=None: huggingface_hub's own default
    with pytest.raises(FetchError) as info:
        collect(tmp_path / "c", "org/private/flaky.ckpt")
    said.append(_everything_said(info.value, caplog, None, tmp_path / "c"))
    monkeypatch.delenv("HF_TOKEN")
    encoder, pt = collect(tmp_path / "c", "org/private/enc.ckpt", token=token)
    assert digest(encoder) == weights[1]
    said.append(_everything_said(None, caplog, pt, tmp_path / "c"))
    text = "\n".join(said)
    assert "HTTP 401" in text and "404" in text and "HTTP 500" in text  # the failures were described...
    assert token not in text and "hf_WRONG_secret_456" not in text  # ...without the tokens
    assert {r.headers.get("authorization") for r in hub.requests} >= {f"Bearer {token}"}  # yet they were sent


def test_url_credentials_are_sent_but_never_shown(tmp_path, http_server, weights, caplog):
    data, expected = weights
    http_server.add("m/enc.ckpt", data)
    http_server.fail("flaky.ckpt", Fault("status", times=-1, status=500))
    http_server.add("m/flaky.ckpt", data)
    host = http_server.url.split("://", 1)[1]
    caplog.set_level(logging.DEBUG)
    said = []
    for name in ["missing.ckpt", "flaky.ckpt"]:
        for url in [f"http://alice:s3cr3t-pass@{host}/m/{name}", f"http://{host}/m/{name}?pwd=qs-s3cr3t&v=2"]:
            with pytest.raises(FetchError) as info:
                collect(tmp_path / "c", url, shown_query=("v",))
            assert "***" in str(info.value)
            said.append(_everything_said(info.value, caplog, None, tmp_path / "c"))
    for url in [f"http://alice:s3cr3t-pass@{host}/m/enc.ckpt", f"http://{host}/m/enc.ckpt?pwd=qs-s3cr3t&v=2"]:
        encoder, pt = collect(tmp_path / f"ok{len(said)}", url, shown_query=("v",))
        assert digest(encoder) == expected
        shown = pt.provenance()[KEY]
        assert "***" in shown["location"]
        said.append(_everything_said(None, caplog, pt, tmp_path / f"ok{len(said)}"))
    text = "\n".join(said)
    assert "s3cr3t" not in text, [line for line in text.splitlines() if "s3cr3t" in line][:3]
    assert "v=2" in text and "pwd=***" in text  # every query value is masked, but those declared not secret
    basic = "Basic " + base64.b64encode(b"alice:s3cr3t-pass").decode()
    assert basic in {r.headers.get("authorization") for r in http_server.requests}
    assert all("s3cr3t" not in r.headers.get("authorization", "") for r in http_server.requests if "?pwd" in r.path)


def test_callback_records_no_credentials(tmp_path, http_server, weights):
    from pl_pretrain import PretrainerCallback

    host = http_server.url.split("://", 1)[1]
    http_server.add("m/enc.ckpt", weights[0])
    callback = PretrainerCallback(
        collect_in=tmp_path / "c",
        loadables={KEY: module(seed=1), "decoder": module(seed=2)},
        paths={
            KEY: f"http://alice:s3cr3t-pass@{host}/m/enc.ckpt",
            "decoder": f"http://{host}/m/enc.ckpt?token=qs-s3cr3t",
        },
        fetch_config=FetchConfig(token="hf_TOPSECRET_token_123", **FAST),
    )
    callback.collect()
    callback.pretrainer.load_collected()
    text = json.dumps(
        [callback.state_dict(), callback.pretrainer.provenance(), repr(callback.fetch_config)], default=str
    )
    assert "s3cr3t" not in text and "hf_TOPSECRET" not in text, text
    assert "***@" in text and "token=***" in text


# ------------------------------------------------------------------------------------------
# A filesystem that refuses symbolic links (Windows without developer mode, some network mounts)
# ------------------------------------------------------------------------------------------


def test_refused_symlinks_fall_back_to_copies_with_one_warning(tmp_path, hub, monkeypatch, weights):
    data, expected = weights
    src = tmp_path / "src"
    src.mkdir()
    (src / "enc.ckpt").write_bytes(data)
    (src / "dec.ckpt").write_bytes(data)
    hub.add_file("org/asr", "head.ckpt", data)
    collect_in = tmp_path / "c"
    real_symlink = os.symlink

    def refusing_symlink(target, link, *args, **kwargs):
        if str(link).startswith(str(collect_in)):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(link))
        return real_symlink(target, link, *args, **kwargs)

    monkeypatch.setattr(os, "symlink", refusing_symlink)
    monkeypatch.setattr(placement, "_symlink_fallback_warned", False)
    mods = {k: module(seed=i) for i, k in enumerate(["encoder", "decoder", "head"])}
    paths = {"encoder": str(src / "enc.ckpt"), "decoder": str(src / "dec.ckpt"), "head": "org/asr/head.ckpt"}
    for run in range(2):  # the second run reuses the copies, silently
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pt = Pretrainer(collect_in, mods, paths=paths)
            collected = pt.collect_files(local_strategy=LocalStrategy.SYMLINK)
            pt.load_collected()
        ours = [w for w in caught if "Could not create a symbolic link" in str(w.message)]
        assert len(ours) == (1 if run == 0 else 0), [str(w.message) for w in caught]
        if run == 0:
            assert "LocalStrategy.COPY" in str(ours[0].message)
        for key, path in collected.items():
            assert path.is_file() and not path.is_symlink() and path.read_bytes() == data
            assert digest(mods[key]) == expected
    assert (src / "enc.ckpt").read_bytes() == data


# ------------------------------------------------------------------------------------------
# Every rank raises the same error (real gloo ranks; rank 0 fetches)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_rank_raises_the_same_error(tmp_path, http_server, hub, weights):
    data = weights[0]
    http_server.add("m500/encoder.ckpt", data)
    http_server.fail("m500/encoder.ckpt", Fault("status", times=-1, status=500))
    http_server.add("mok/encoder.ckpt", data)
    hub.add_file("org/private", "encoder.ckpt", data, token="hf_right_token")
    hub.add_file("org/liar", "encoder.ckpt", data)
    hub.lying_etags["encoder.ckpt"] = sha(b"something else")
    fast = {"retries": 1, "backoff": 0.01, "timeout": 5.0}
    cells = {
        "url-500": ({"source": f"{http_server.url}/m500"}, "FetchError", ["failed 2 times", "HTTP 500"]),
        "url-checksum": (
            {"source": f"{http_server.url}/mok", "checksums": {KEY: "sha256:" + "0" * 64}},
            "ChecksumError",
            ["0" * 64, sha(data)],
        ),
        "url-offline": (
            {"source": f"{http_server.url}/mok", "fetch_config": {"allow_network": False}},
            "OfflineError",
            ["offline"],
        ),
        "hub-401": (
            {"source": "org/private", "fetch_config": {**fast, "token": "hf_wrong"}},
            "FetchError",
            ["HTTP 401"],
        ),
        "hub-etag": ({"source": "org/liar"}, "ChecksumError", ["ETag", sha(data)]),
        "bad-scheme": ({"source": "ftp://127.0.0.1/models"}, "ConfigurationError", ["Only http:// and https://"]),
    }
    run_cells = []
    for name, (cell, _, _) in cells.items():
        run_cells.append({"fetch_config": fast, **cell, "collect_in": str(tmp_path / name), "strategy": "SYMLINK"})
    per_rank = assert_all_ok(run_ranks(rank_jobs.collect_cells, 2, args=(run_cells,), timeout=120))
    for index, (name, (cell, error_type, causes)) in enumerate(cells.items()):
        outcomes = [outcomes[index] for outcomes in per_rank]
        assert len({o["text"] for o in outcomes}) == 1, f"{name}: ranks differ: {outcomes}"
        for rank, outcome in enumerate(outcomes):
            assert outcome["error"] == error_type, f"{name} rank {rank}: {outcome}"
            assert outcome["key"] == KEY and outcome["rank_in_error"] == 0 and outcome["value_error"]
            text = outcome["text"]
            assert f"loadable '{KEY}'" in text and f"source '{cell['source']}'" in text and "rank 0" in text, text
            for cause in causes:
                assert cause in text, f"{name}: {cause!r} not in {text}"
        assert_nothing_trusted(tmp_path / name)
    assert http_server.arrivals("GET", "m500/encoder.ckpt") == fast["retries"] + 1  # rank 0 only


# ------------------------------------------------------------------------------------------
# docs/faults.md names only tests that exist
# ------------------------------------------------------------------------------------------


def test_fault_table_names_real_tests():
    import re

    root = pathlib.Path(__file__).parent
    table = (root.parent / "docs" / "faults.md").read_text()
    named = set(re.findall(r"(test_\w+\.py)::(test_\w+)", table))
    assert len(named) >= 25
    for module_file, name in sorted(named):
        assert f"def {name}(" in (root / module_file).read_text(), f"docs/faults.md names {module_file}::{name}"
