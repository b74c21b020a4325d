"""Object stores that misbehave: throttling, cut bodies, slowness, missing objects, refused credentials, secrets.

Each story collects an ``encoder`` from a real server on 127.0.0.1 (tests/objectstores.py) whose
proxy misbehaves on purpose, and asserts what the user sees (the error's type and text, naming
the key, the bucket and the object), how many requests were made, and that nothing a later run
would trust is left behind. docs/faults.md tabulates these cases.
"""

from __future__ import annotations

import json
import logging
import traceback

import pytest
from helpers import ckpt_bytes, digest, module
from servers import Fault
from test_faults import FAST, FILE, KEY, _everything_said, collect, collect_fails

from pl_pretrain import FetchConfig, LocalStrategy, PretrainerCallback
from pl_pretrain.errors import FetchError

# Real servers, one of them (Azurite) in another process.
pytestmark = pytest.mark.slow


@pytest.fixture
def weights():
    mod = module(seed=8)
    return ckpt_bytes(mod), digest(mod)


# ------------------------------------------------------------------------------------------
# Transient faults are retried within FetchConfig.retries
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [Fault("status", status=503), Fault("drop")], ids=["503-SlowDown", "drop"])
def test_s3_transient_failure_once_is_retried(tmp_path, s3, weights, fault):
    url = s3.put("flaky/encoder.ckpt", weights[0])
    s3.proxy.fail("flaky/encoder.ckpt", fault)
    encoder, _ = collect(tmp_path / "c", url)
    assert digest(encoder) == weights[1]
    assert s3.body_gets("flaky/encoder.ckpt") == 2  # the failed attempt, then the good one
    assert (tmp_path / "c" / FILE).read_bytes() == weights[0]
    assert not list((tmp_path / "c").glob(".*.tmp"))


@pytest.mark.parametrize(
    "fault, cause",
    [
        (Fault("status", times=-1, status=503), "last cause: HTTP 503"),
        (Fault("drop", times=-1), "last cause: ClientPayloadError"),
    ],
    ids=["503-SlowDown", "drop"],
)
def test_s3_failing_every_time_is_reported_after_the_retries(tmp_path, s3, weights, fault, cause):
    url = s3.put("down/encoder.ckpt", weights[0])
    s3.proxy.fail("down/encoder.ckpt", fault)
    collect_fails(tmp_path / "c", url, FetchError, "failed 3 times", cause, url, source=s3.url("down"))
    assert s3.body_gets("down/encoder.ckpt") == FAST["retries"] + 1
    assert not list(tmp_path.rglob(".*.tmp"))  # nor in the object cache


@pytest.mark.slow
def test_s3_slow_but_steady_download_succeeds(tmp_path, s3):
    data = ckpt_bytes(module(seed=3))
    url = s3.put("slow/encoder.ckpt", data)
    s3.proxy.fail("slow/encoder.ckpt", Fault("slow", times=-1, delay=0.05, chunk=len(data) // 40 + 1))
    encoder, _ = collect(tmp_path / "c", url, timeout=1.0, strategy=LocalStrategy.COPY)
    assert digest(encoder) == digest(module(seed=3))  # 2 s in all, never 1 s of silence
    assert s3.body_gets("slow/encoder.ckpt") == 1


# ------------------------------------------------------------------------------------------
# 404 and 403: reported after one request, never retried
# ------------------------------------------------------------------------------------------


def test_a_missing_object_is_reported_after_one_request(tmp_path, store):
    url = store.url("nowhere/encoder.ckpt")
    word = "container" if store.scheme == "az" else "bucket"
    error = collect_fails(
        tmp_path / "c", url, FetchError, "Object 'nowhere/encoder.ckpt' does not exist", f"{word} 'models'", "404"
    )
    assert "Check the" in str(error)
    # Not retried: one request for the object (gcsfs's `info` itself asks twice before it gives up).
    assert store.requests_for("nowhere/encoder.ckpt") == (2 if store.scheme == "gs" else 1)
    assert store.body_gets("nowhere/encoder.ckpt") == 0


def test_refused_credentials_are_reported_after_one_request_with_a_hint(tmp_path, store, monkeypatch):
    url = store.put("private/encoder.ckpt", ckpt_bytes(module(seed=1)))
    if store.scheme == "gs":
        # The emulator checks no credentials: the proxy answers what GCS answers a reader without access.
        store.proxy.fail("/b/models/", Fault("status", times=-1, status=403), metadata=True)
    else:
        for name, value in store.bad_env.items():
            monkeypatch.setenv(name, value)  # a wrong secret: the server itself refuses the signature
    hint = {
        "s3": "AWS_SECRET_ACCESS_KEY",
        "gs": "GOOGLE_APPLICATION_CREDENTIALS",
        "az": "AZURE_STORAGE_CONNECTION_STRING",
    }
    collect_fails(tmp_path / "c", url, FetchError, "HTTP 403", "credentials are missing, wrong", hint[store.scheme])
    assert store.requests_for("private/encoder.ckpt") == 1


def test_s3_without_any_credentials_says_so_before_sending_anything(tmp_path, s3, monkeypatch):
    url = s3.put("nocreds/encoder.ckpt", ckpt_bytes(module(seed=1)))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    collect_fails(tmp_path / "c", url, FetchError, "NoCredentialsError", "AWS_ACCESS_KEY_ID")
    assert s3.proxy.count() == 0


def test_a_prefix_is_not_an_object(tmp_path, s3):
    s3.put("folder/inner/encoder.ckpt", ckpt_bytes(module(seed=1)))
    collect_fails(tmp_path / "c", s3.url("folder/inner"), FetchError, "is a folder (a prefix of other objects)")


# ------------------------------------------------------------------------------------------
# Secrets: never in an error, a log line, provenance, a record or the callback's state
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["environment", "storage_options"])
@pytest.mark.parametrize("name", ["s3", "azure"])
def test_object_store_credentials_are_never_shown(tmp_path, request, monkeypatch, caplog, weights, name, how):
    store = request.getfixturevalue(name)
    store.put("m/encoder.ckpt", weights[0])
    store.put("m/flaky.ckpt", weights[0])
    store.proxy.fail("flaky.ckpt", Fault("status", times=-1, status=503))
    options = None
    if how == "storage_options":
        if name == "s3":
            options = {"endpoint_url": store.proxy.url, "key": store.extra["access"], "secret": store.extra["secret"]}
        else:
            options = {"connection_string": store.env["AZURE_STORAGE_CONNECTION_STRING"]}
        for variable in store.env:
            monkeypatch.delenv(variable)
    caplog.set_level(logging.DEBUG)
    said = []
    cases = [("missing.ckpt", options), ("private.ckpt", {**(options or {}), **store.bad_credentials})]
    if name == "s3":
        cases.append(("flaky.ckpt", options))  # retried with warnings (Azure's own retries would wait minutes)
    store.put("m/private.ckpt", weights[0])
    for file, opts in cases:
        with pytest.raises(FetchError) as info:
            collect(tmp_path / "c", store.url(f"m/{file}"), storage_options=opts, retries=1, backoff=0.01)
        said.append(_everything_said(info.value, caplog, None, tmp_path / "c"))
    encoder, pt = collect(tmp_path / "ok", store.url("m/encoder.ckpt"), storage_options=options)
    assert digest(encoder) == weights[1]
    said.append(_everything_said(None, caplog, pt, tmp_path / "ok"))
    callback = PretrainerCallback(
        collect_in=tmp_path / "cb",
        loadables={KEY: module(seed=1)},
        paths={KEY: store.url("m/encoder.ckpt")},
        fetch_config=FetchConfig(storage_options=options or store.bad_credentials),
    )
    said.append(json.dumps([callback.state_dict(), repr(callback.fetch_config)], default=str))
    text = "\n".join(said)
    assert "404" in text and "403" in text  # the failures were described...
    secrets = [*store.secrets, *[v for k, v in store.bad_credentials.items() if k != "key"]]
    for secret in secrets:
        pieces = [secret, *(p for p in secret.split(";") if "AccountKey=" in p)]
        for piece in pieces:
            assert piece not in text, [line for line in text.splitlines() if piece in line][:3]  # ...without secrets


def _held(error: BaseException) -> list[BaseException]:
    """Returns `error` and every exception it holds: causes and contexts, suppressed ones too (an error
    reporter, a debugger or an `except` block that looks at ``__context__`` reaches those)."""
    held: list[BaseException] = []
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is not None and all(current is not seen for seen in held):
            held.append(current)
            todo += [current.__cause__, current.__context__]
    return held


@pytest.mark.parametrize("status", [400, 503], ids=["400-reported", "503-retried"])
def test_a_token_the_server_echoes_is_in_no_exception_the_error_holds(tmp_path, s3, weights, monkeypatch, status):
    # A role's temporary credentials from the standard environment, and a gateway that quotes the
    # request's session token in its error body: botocore and s3fs put that body in their exceptions.
    credentials = s3.extra["temporary_credentials"]()
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    url = s3.put("echo/encoder.ckpt", weights[0])
    s3.proxy.fail("echo/encoder.ckpt", Fault("status", times=-1, status=status, echo_authorization=True))
    with pytest.raises(FetchError) as info:
        collect(tmp_path / "c", url, retries=1, backoff=0.01)
    printed = "".join(traceback.format_exception(info.value))
    assert "echo/encoder.ckpt" in printed and "token: ***" in printed  # the server's words are shown, masked
    held = _held(info.value)
    assert len(held) >= 2  # the backend's error is there, as a scrubbed cause
    for secret in (credentials["AWS_SESSION_TOKEN"], credentials["AWS_SECRET_ACCESS_KEY"]):
        for error in held:
            text = "".join(traceback.format_exception(error))
            assert secret not in text, (
                type(error).__name__,
                [line for line in text.splitlines() if secret in line][:2],
            )
