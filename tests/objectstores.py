"""Object stores on loopback for the tests: S3 (moto), GCS (gcp-storage-emulator), Azure (Azurite).

Each real server runs once per test session on 127.0.0.1, behind a `Proxy` (also on 127.0.0.1)
that counts every request it forwards and can misbehave on purpose, as the servers in
tests/servers.py do: answer a status first (503 SlowDown; with ``echo_authorization``, quoting the
request's credentials in the error, as some gateways do), cut a body half-way, send slowly.
Clients (pl_pretrain, and every rank the harness spawns) reach the proxy through each
ecosystem's standard environment (`Store.env`); the tests' own uploads go to the server directly,
so the proxy's log holds only what the code under test asked for.

- S3: moto's ``ThreadedMotoServer`` in this process, with authentication on: requests must be
  signed with the access key the fixture creates, so a wrong secret is a real 403.
- GCS: gcp-storage-emulator in this process (it checks no credentials: a 403 is injected).
- Azure: Azurite (``azurite-blob`` from the npm registry) as a child process; it checks the shared
  key, so a wrong account key is a real 403. It is looked for in $AZURITE_BLOB, then
  tests/.node/node_modules/.bin (where .ci/services.sh installs it), then $PATH.

A store whose server is not installed is skipped with the command that installs it, except under
CI (``CI=true``), where .ci/run installs every one: there a missing server fails the test.
"""

from __future__ import annotations

import http.client
import http.server
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import free_port
from servers import Fault, Request

REPO = pathlib.Path(__file__).resolve().parents[1]

# gcsfs reads this when it is imported: else it asks a gRPC API about each bucket's kind, and
# each call waits 60 s against the emulator. Set before any test imports gcsfs.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
BUCKET = "models"
INSTALL_HINT = "pip install -e '.[test,cloud]', then bash .ci/services.sh (Azurite from npm into tests/.node)"

# Azurite's documented development account (public, the same in every Azurite install).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te", "trailer"}
_PIECE = 1024 * 1024
_TOKEN_HEADER = "X-Amz-Security-Token"  # where an S3 client sends AWS_SESSION_TOKEN


def _absent(what: str) -> None:
    """Skips the test for want of a server, or fails it under CI, which must have installed every one."""
    message = f"{what}: {INSTALL_HINT}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the object-store tests, but {message}")
    pytest.skip(message)


def _wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it listened on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout:g} s")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Proxy:
    """Forwards HTTP requests to `upstream` on loopback; logs each one and injects faults.

    Args:
        upstream: ``http://127.0.0.1:<port>`` of the real server.
        is_body: ``(method, path) -> bool``: whether a request reads an object's bytes (faults
            apply only to those, and `body_gets` counts them).
        error_body: ``status -> (content type, body)``: what this store says with an injected status.
    """

    def __init__(
        self,
        upstream: str,
        is_body: Callable[[str, str], bool],
        error_body: Callable[[int], tuple[str, bytes]],
    ) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.is_body = is_body
        self.error_body = error_body
        self.requests: list[Request] = []
        self.faults: dict[str, tuple[Fault, bool]] = {}  # path part -> (fault, whether any request misbehaves)
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), self._handler())
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def reset(self) -> None:
        """Forgets the log and every fault."""
        with self._lock:
            self.requests.clear()
            self.faults.clear()

    def fail(self, path_part: str, fault: Fault, *, metadata: bool = False) -> None:
        """Makes requests that read the bytes of an object whose path contains `path_part` misbehave
        (with `metadata`, every request for that path, its metadata included)."""
        with self._lock:
            self.faults[path_part] = (fault, metadata)

    def count(self, method: str | None = None, path_part: str = "") -> int:
        """Returns how many requests (of `method`, for a path containing `path_part`) arrived."""
        with self._lock:
            return sum(1 for r in self.requests if (method is None or r.method == method) and path_part in r.path)

    def body_gets(self, path_part: str = "") -> int:
        """Returns how many requests read the bytes of an object whose path contains `path_part`."""
        with self._lock:
            return sum(1 for r in self.requests if self.is_body(r.method, r.path) and path_part in r.path)

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for part, (fault, metadata) in self.faults.items():
                if part in path and fault.times != 0 and (metadata or self.is_body(method, path)):
                    if fault.times > 0:
                        fault.times -= 1
                    return fault
        return None

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_GET

        return Handler

    def _read_request_body(self, h: http.server.BaseHTTPRequestHandler) -> bytes:
        length = h.headers.get("Content-Length")
        if length is not None:
            return h.rfile.read(int(length))
        if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
            pieces = []
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                pieces.append(h.rfile.read(size))
                h.rfile.readline()
            return b"".join(pieces)
        return b""

    def _forward(self, h: http.server.BaseHTTPRequestHandler) -> None:
        method, path = h.command, h.path
        body = self._read_request_body(h)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or method in ("PUT", "POST", "PATCH"):
            headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
            headers["Content-Length"] = str(len(body))
        entry = Request(method, path, 0, {k.lower(): v for k, v in h.headers.items()})
        fault = self._fault_for(method, path)
        if fault is not None and fault.kind == "status":
            entry.status = fault.status
            with self._lock:
                self.requests.append(entry)  # logged before answering, as tests/servers.py does
            content_type, payload = self.error_body(fault.status)
            if fault.echo_authorization:  # a gateway that quotes the request's credentials in its error
                said = f" (Authorization: {h.headers.get('Authorization')}; token: {h.headers.get(_TOKEN_HEADER)})"
                payload = payload.replace(b"</Message>", said.encode() + b"</Message>")
            h.send_response(fault.status)
            h.send_header("Content-Type", content_type)
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=120)
        try:
            upstream.request(method, path, body=body or None, headers=headers)
            response = upstream.getresponse()
            entry.status = response.status
            with self._lock:
                self.requests.append(entry)
            out_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            length = response.getheader("Content-Length")
            if method == "HEAD" or response.status in (204, 304):
                payload, streamed = b"", False
            elif length is None:
                payload, streamed = response.read(), False
                out_headers = [(k, v) for k, v in out_headers if k.lower() != "content-length"]
                out_headers.append(("Content-Length", str(len(payload))))
            else:
                payload, streamed = b"", True
            h.send_response(response.status)
            for name, value in out_headers:
                h.send_header(name, value)
            if fault is not None:
                h.send_header("Connection", "close")
            h.end_headers()
            if streamed:
                self._stream(h, response, int(length or 0), fault, entry)
            elif payload:
                h.wfile.write(payload)
                entry.bytes_sent = len(payload)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True
        finally:
            upstream.close()

    def _stream(self, h, response, length: int, fault: Fault | None, entry: Request) -> None:
        limit = length // 2 if fault is not None and fault.kind in ("drop", "short") else length
        piece = fault.chunk if fault is not None and fault.kind == "slow" else _PIECE
        sent = 0
        while sent < limit:
            data = response.read(min(piece, limit - sent))
            if not data:
                break
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.delay)
            h.wfile.write(data)
            sent += len(data)
            entry.bytes_sent = sent
        if limit < length:
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)


@dataclass
class Store:
    """One object store behind its proxy, as the tests use it.

    Attributes:
        scheme: ``s3``, ``gs`` or ``az``.
        proxy: the counting, fault-injecting proxy the clients talk to.
        env: the standard environment that points a client at the proxy, with working credentials.
        secrets: the credentials in `env`, which must never be shown.
        upload: ``(key, data)``: writes an object straight to the server (not through the proxy).
        delete: ``(key)``: removes an object straight on the server.
        bad_credentials: storage options (or environment) with a wrong secret, for a real 403.
    """

    scheme: str
    proxy: Proxy
    env: dict[str, str]
    secrets: list[str]
    upload: Callable[..., None]
    delete: Callable[..., None]
    bad_credentials: dict[str, Any] = field(default_factory=dict)
    bad_env: dict[str, str] = field(default_factory=dict)
    stop: Callable[[], None] = lambda: None
    extra: dict[str, Any] = field(default_factory=dict)

    def url(self, key: str = "", bucket: str = BUCKET) -> str:
        """Returns the address of `key` in `bucket`, as a user writes it (``s3://models/asr``)."""
        return f"{self.scheme}://{bucket}/{key}".rstrip("/")

    def put(self, key: str, data: bytes) -> str:
        """Uploads `data` as `key` (straight to the server) and returns its address."""
        self.upload(key, data)
        return self.url(key)

    def body_gets(self, key: str) -> int:
        """Returns how many requests through the proxy read the bytes of `key`."""
        return self.proxy.body_gets(self.path_part(key))

    def requests_for(self, key: str) -> int:
        """Returns how many requests through the proxy were for the object `key` itself (metadata and bytes)."""
        suffix = "/" + self.path_part(key)
        with self.proxy._lock:
            return sum(1 for r in self.proxy.requests if urllib.parse.urlsplit(r.path).path.endswith(suffix))

    def path_part(self, key: str) -> str:
        """Returns how `key` appears in this store's request paths."""
        if self.scheme == "gs":
            return urllib.parse.quote(key, safe="")
        return key


# ----------------------------------------------------------------------------------------------
# S3: moto
# ----------------------------------------------------------------------------------------------


def _s3_error(status: int) -> tuple[str, bytes]:
    code, message = {
        503: ("SlowDown", "Please reduce your request rate."),
        500: ("InternalError", "We encountered an internal error. Please try again."),
        403: ("AccessDenied", "Access Denied"),
    }.get(status, ("InternalError", "injected"))
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
    return "application/xml", body.encode()


def _s3_is_body(method: str, path: str) -> bool:
    # GET /bucket/key reads bytes; GET /bucket?list-type=... lists.
    parts = urllib.parse.urlsplit(path)
    return method == "GET" and parts.path.strip("/").count("/") >= 1


def start_s3() -> Store:
    """Starts moto's S3 with authentication on, a bucket `BUCKET`, and a versioned bucket ``versioned``."""
    try:
        import boto3
        import s3fs  # noqa: F401  (the backend under test)
        from moto import settings
        from moto.server import ThreadedMotoServer
    except ImportError:
        _absent("moto[server] and boto3 are not installed")
    for name in ("werkzeug", "moto"):
        logging.getLogger(name).setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    direct = f"http://{host}:{port}"
    # From here on every request must be signed by a key moto's IAM knows: the first 3 actions
    # (which create that key) are the only ones allowed without it.
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 3
    boot = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap", "region_name": "us-east-1"}
    iam = boto3.client("iam", endpoint_url=direct, **boot)
    iam.create_user(UserName="reader")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="reader", PolicyName="all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    access, secret = key["AccessKeyId"], key["SecretAccessKey"]
    client = boto3.client(
        "s3", endpoint_url=direct, aws_access_key_id=access, aws_secret_access_key=secret, region_name="us-east-1"
    )
    client.create_bucket(Bucket=BUCKET)
    client.create_bucket(Bucket="versioned")
    client.put_bucket_versioning(Bucket="versioned", VersioningConfiguration={"Status": "Enabled"})
    proxy = Proxy(direct, _s3_is_body, _s3_error)
    env = {
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_ACCESS_KEY_ID": access,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
    }

    def upload(name: str, data: bytes, bucket: str = BUCKET) -> None:
        client.put_object(Bucket=bucket, Key=name, Body=data)

    def delete(name: str, bucket: str = BUCKET) -> None:
        client.delete_object(Bucket=bucket, Key=name)

    def stop() -> None:
        proxy.stop()
        server.stop()

    def temporary_credentials() -> dict[str, str]:
        """Returns the environment of a role's temporary credentials (with AWS_SESSION_TOKEN), as on EC2 or SSO."""
        signed = {"endpoint_url": direct, "aws_access_key_id": access, "aws_secret_access_key": secret}
        iam = boto3.client("iam", region_name="us-east-1", **signed)
        if not any(role["RoleName"] == "reader-role" for role in iam.list_roles()["Roles"]):
            trust = {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}
            document = json.dumps({"Version": "2012-10-17", "Statement": [trust]})
            iam.create_role(RoleName="reader-role", AssumeRolePolicyDocument=document)
            iam.put_role_policy(RoleName="reader-role", PolicyName="all", PolicyDocument=json.dumps(policy))
        arn = iam.get_role(RoleName="reader-role")["Role"]["Arn"]
        sts = boto3.client("sts", region_name="us-east-1", **signed)
        given = sts.assume_role(RoleArn=arn, RoleSessionName="reader")["Credentials"]
        return {
            "AWS_ACCESS_KEY_ID": given["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": given["SecretAccessKey"],
            "AWS_SESSION_TOKEN": given["SessionToken"],
        }

    return Store(
        "s3",
        proxy,
        env,
        [secret],
        upload,
        delete,
        bad_credentials={"key": access, "secret": "WRONG" + secret[5:]},
        bad_env={"AWS_SECRET_ACCESS_KEY": "WRONG" + secret[5:]},
        stop=stop,
        extra={
            "client": client,
            "direct": direct,
            "access": access,
            "secret": secret,
            "temporary_credentials": temporary_credentials,
        },
    )


# ----------------------------------------------------------------------------------------------
# GCS: gcp-storage-emulator
# ----------------------------------------------------------------------------------------------


def _gcs_error(status: int) -> tuple[str, bytes]:
    reason = {403: "forbidden", 503: "backendError"}.get(status, "backendError")
    message = {403: "Caller does not have storage.objects.get access."}.get(status, "injected failure")
    body = {"error": {"code": status, "message": message, "errors": [{"reason": reason, "message": message}]}}
    return "application/json", json.dumps(body).encode()


def _gcs_is_body(method: str, path: str) -> bool:
    # Object bytes are read with ?alt=media; a GET without it reads the object's metadata.
    return method == "GET" and "alt=media" in path


def start_gcs() -> Store:
    """Starts gcp-storage-emulator in memory with a bucket `BUCKET`."""
    try:
        import gcsfs
        from gcp_storage_emulator.server import create_server
    except ImportError:
        _absent("gcp-storage-emulator and gcsfs are not installed")
    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    direct = f"http://127.0.0.1:{port}"
    _wait_for_port(port, 30)
    fs = gcsfs.GCSFileSystem(endpoint_url=direct, token="anon", skip_instance_cache=True)
    proxy = Proxy(direct, _gcs_is_body, _gcs_error)
    env = {
        "STORAGE_EMULATOR_HOST": proxy.url,
        # Else gcsfs asks a gRPC API about the bucket's kind, and waits 60 s for each call.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
    }

    def upload(name: str, data: bytes) -> None:
        fs.pipe_file(f"{BUCKET}/{name}", data)

    def delete(name: str) -> None:
        fs.rm_file(f"{BUCKET}/{name}")

    def stop() -> None:
        proxy.stop()
        server.stop()

    return Store("gs", proxy, env, [], upload, delete, stop=stop, extra={"direct": direct})


# ----------------------------------------------------------------------------------------------
# Azure: Azurite
# ----------------------------------------------------------------------------------------------


def _azure_error(status: int) -> tuple[str, bytes]:
    code = {403: "AuthorizationFailure", 503: "ServerBusy", 500: "InternalError"}.get(status, "InternalError")
    body = f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>injected</Message></Error>'
    return "application/xml", body.encode()


def _azure_is_body(method: str, path: str) -> bool:
    # GET /account/container/blob reads bytes; GET /account/container?restype=container... lists.
    parts = urllib.parse.urlsplit(path)
    return method == "GET" and parts.path.strip("/").count("/") >= 2 and "comp=" not in parts.query


def azurite_binary() -> str | None:
    """Returns the path of ``azurite-blob``, or None when it is not installed."""
    for candidate in (
        os.environ.get("AZURITE_BLOB"),
        str(REPO / "tests" / ".node" / "node_modules" / ".bin" / "azurite-blob"),
        shutil.which("azurite-blob"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def connection_string(endpoint: str, key: str = AZURITE_KEY) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
        f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};"
    )


def start_azure() -> Store:
    """Starts Azurite's blob service in memory with a container `BUCKET`."""
    binary = azurite_binary()
    try:
        import adlfs
    except ImportError:
        _absent("adlfs is not installed")
    if binary is None or shutil.which("node") is None:
        _absent("Azurite (azurite-blob) or node is not installed")
    port = free_port()
    workspace = tempfile.mkdtemp(prefix="azurite_")
    process = subprocess.Popen(
        [
            binary,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--inMemoryPersistence",
            "--disableTelemetry",  # else it reports to a server on the internet
            "--disableProductStyleUrl",
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
        ],
        cwd=workspace,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, 60, process)
    except RuntimeError:
        process.kill()
        raise
    direct = f"http://127.0.0.1:{port}"
    fs = adlfs.AzureBlobFileSystem(connection_string=connection_string(direct), skip_instance_cache=True)
    fs.mkdir(BUCKET)
    proxy = Proxy(direct, _azure_is_body, _azure_error)
    wrong_key = "WRONG" + AZURITE_KEY[5:]

    def upload(name: str, data: bytes) -> None:
        fs.pipe_file(f"{BUCKET}/{name}", data)

    def delete(name: str) -> None:
        fs.rm_file(f"{BUCKET}/{name}")

    def stop() -> None:
        proxy.stop()
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(workspace, ignore_errors=True)

    return Store(
        "az",
        proxy,
        {"AZURE_STORAGE_CONNECTION_STRING": connection_string(proxy.url)},
        [AZURITE_KEY],
        upload,
        delete,
        bad_credentials={"connection_string": connection_string(proxy.url, wrong_key)},
        bad_env={"AZURE_STORAGE_CONNECTION_STRING": connection_string(proxy.url, wrong_key)},
        stop=stop,
        extra={"direct": direct},
    )


# The environment a client may read that would point it elsewhere than the loopback stores.
CLEARED = [
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
]
ISOLATED = {
    # No instance-metadata probing (it is not on loopback) and no user config files.
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def session_store(start: Callable[[], Store]) -> Iterator[Store]:
    store = start()
    try:
        yield store
    finally:
        store.stop()


def use_store(store: Store, monkeypatch: pytest.MonkeyPatch) -> Store:
    """Points this test (and every process it starts) at `store`, with a fresh request log."""
    for name in CLEARED:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**ISOLATED, **store.env}.items():
        monkeypatch.setenv(name, value)
    store.proxy.reset()
    return store


@pytest.fixture(scope="session")
def _s3_session() -> Iterator[Store]:
    yield from session_store(start_s3)


@pytest.fixture(scope="session")
def _gcs_session() -> Iterator[Store]:
    yield from session_store(start_gcs)


@pytest.fixture(scope="session")
def _azure_session() -> Iterator[Store]:
    yield from session_store(start_azure)


@pytest.fixture
def s3(_s3_session: Store, monkeypatch: pytest.MonkeyPatch) -> Store:
    """moto's S3 behind a counting proxy; the environment points at it with working credentials."""
    return use_store(_s3_session, monkeypatch)


@pytest.fixture
def gcs(_gcs_session: Store, monkeypatch: pytest.MonkeyPatch) -> Store:
    """gcp-storage-emulator behind a counting proxy; STORAGE_EMULATOR_HOST points at it."""
    return use_store(_gcs_session, monkeypatch)


@pytest.fixture
def azure(_azure_session: Store, monkeypatch: pytest.MonkeyPatch) -> Store:
    """Azurite behind a counting proxy; AZURE_STORAGE_CONNECTION_STRING points at it."""
    return use_store(_azure_session, monkeypatch)


@pytest.fixture(params=["s3", "gcs", "azure"])
def store(request: pytest.FixtureRequest) -> Store:
    """Each object store in turn."""
    return request.getfixturevalue(request.param)
