"""Loopback servers for the tests: a plain file server and a Hugging Face Hub look-alike.

Both run in a thread of the test process on 127.0.0.1, record every request they get (so a test
can count downloads; `arrivals` counts requests as they arrive, before any answer, so a stalled
one counts too, with its time in `arrival_times`), and can misbehave on purpose (drop a connection
half-way, answer 500 or 429 with a ``Retry-After`` first, announce more bytes than they send, send
slowly or one byte at a time, send a body that never ends, close without answering, echo the
client's ``Authorization`` header in an error body as some proxies do; the Hub can also announce a
false ETag). A fault hits GET requests unless told otherwise (``methods=("HEAD", "GET")``): the Hub's
metadata request is a HEAD, and a stand-in that never fails it hides every bug of that path.

`FileServer` answers like nginx or S3: ``Accept-Ranges: bytes``, a strong ``ETag`` and
``Last-Modified``, ``Range`` requests (206) honoured only while ``If-Range`` still matches (else the
whole file, 200); ``FileServer(ranges=False)`` is a server that knows no ranges.

`HubServer` answers what ``huggingface_hub.hf_hub_download`` asks for:
``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}`` with ``ETag``, ``X-Repo-Commit`` and
``Content-Length``; ``404`` with ``X-Error-Code: EntryNotFound`` / ``RevisionNotFound`` /
``RepoNotFound``; ``401`` for a private repo asked without its token.
"""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import http.server
import json
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    """One request a server got."""

    method: str
    path: str
    status: int
    headers: dict[str, str]  # names in lower case
    bytes_sent: int = 0


@dataclass
class Fault:
    """How a server misbehaves for one path.

    Attributes:
        kind: "drop" (close after half the body), "status" (answer `status` first), "short"
            (announce the full length, send half), "slow" (sleep `delay` seconds per `chunk` bytes;
            ``chunk=1`` is a trickle), "endless" (no ``Content-Length``, `chunk` bytes every `delay`
            seconds until the client goes, or 60 s), "close" (close the connection without
            answering: a reset, as a dead proxy gives); bodies that are not the file: "gzip" (the
            file compressed, with ``Content-Encoding: gzip``, despite ``Accept-Encoding: identity``),
            "html" (a login page, 200, ``text/html``), "html-as-file" (the same page as
            ``application/octet-stream``), "cut" (no ``Content-Length``, half the body, then the
            connection closes), "overlong" (``Content-Length`` announces half of the body that follows).
        times: how many requests misbehave before the server answers normally (-1: always).
        status: the status code for kind "status".
        retry_after: for kind "status", the ``Retry-After`` header to send (seconds or an HTTP date).
        delay: seconds per chunk for kind "slow".
        chunk: bytes per chunk for kind "slow".
        methods: the request methods that misbehave.
        echo_authorization: for kind "status", answer the request's ``Authorization`` header in
            the error's body and ``X-Error-Message`` (a mirror or proxy that echoes it).
    """

    kind: str
    times: int = 1
    status: int = 500
    delay: float = 0.05
    chunk: int = 65536
    methods: tuple[str, ...] = ("GET",)
    echo_authorization: bool = False
    retry_after: str | None = None


_BAD_BODIES = ("gzip", "html", "html-as-file", "cut", "overlong")


def _lower(headers) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Base:
    """Common parts: start/stop, the request log, faults."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.arrived: list[tuple[str, str]] = []  # (method, path) as each request arrives, before any answer
        self.arrival_times: list[tuple[str, str, float]] = []  # (method, path, time.monotonic()) of each
        self.active = 0  # bodies being sent right now
        self.most_active = 0  # the most bodies ever sent at once (concurrent downloads)
        self.faults: dict[str, Fault] = {}
        self._lock = threading.Lock()
        handler = self._make_handler()
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> _Base:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.arrived.clear()
            self.arrival_times.clear()
            self.most_active = 0

    def arrivals(self, method: str | None = None, path_part: str = "") -> int:
        """Returns how many requests arrived (counted before the answer, so a stalled one counts too)."""
        with self._lock:
            return sum(1 for m, p in self.arrived if (method is None or m == method) and path_part in p)

    def gets(self, path_part: str = "") -> list[Request]:
        """Returns the GET requests whose path contains `path_part` and that sent a body."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and path_part in r.path and r.status in (200, 206)]

    def count(self, method: str | None = None, path_part: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.requests if (method is None or r.method == method) and path_part in r.path)

    def fail(self, path_part: str, fault: Fault) -> None:
        """Makes requests whose path contains `path_part` misbehave as `fault` says."""
        self.faults[path_part] = fault

    def _arrive(self, method: str, path: str) -> None:
        with self._lock:
            self.arrived.append((method, path))
            self.arrival_times.append((method, path, time.monotonic()))

    def times(self, method: str = "GET", path_part: str = "") -> list[float]:
        """Returns the arrival times (``time.monotonic()``) of the requests whose path contains `path_part`."""
        with self._lock:
            return [t for m, p, t in self.arrival_times if m == method and path_part in p]

    def _busy(self, delta: int) -> None:
        with self._lock:
            self.active += delta
            self.most_active = max(self.most_active, self.active)

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _fault_for(self, path: str, method: str) -> Fault | None:
        with self._lock:
            for part, fault in self.faults.items():
                if part in path and fault.times != 0 and method in fault.methods:
                    if fault.times > 0:
                        fault.times -= 1
                    return fault
        return None

    def _make_handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                server._arrive("HEAD", self.path)
                server._handle(self, "HEAD")

            def do_GET(self) -> None:
                server._arrive("GET", self.path)
                server._handle(self, "GET")

        return Handler

    def _send(self, h, method: str, status: int, headers: dict[str, str], body: bytes) -> None:
        fault = self._fault_for(h.path, method) if status in (200, 206) else None
        sent = 0
        # Logged before answering: a client never gets an answer the log does not hold yet, so a
        # test that clears the log after its last request cannot receive a late entry.
        if fault is not None and fault.kind == "close":
            self._log(Request(method, h.path, 0, _lower(h.headers)))
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault.kind in _BAD_BODIES and method == "GET":
            self._log(Request(method, h.path, status, _lower(h.headers), len(body)))
            self._bad_body(h, fault.kind, headers, body)
            return
        if fault is not None and fault.kind == "status":
            self._log(Request(method, h.path, fault.status, _lower(h.headers)))
            said = f"upstream refused the request with Authorization: {h.headers.get('Authorization')}"
            error_body = json.dumps({"error": said}).encode() if fault.echo_authorization else b""
            h.send_response(fault.status)
            if fault.echo_authorization:
                h.send_header("Content-Type", "application/json")
                h.send_header("X-Error-Message", said)
            if fault.retry_after is not None:
                h.send_header("Retry-After", fault.retry_after)
            h.send_header("Content-Length", str(len(error_body)))
            h.end_headers()
            if method == "GET":
                h.wfile.write(error_body)
            return
        entry = Request(method, h.path, status, _lower(h.headers))
        self._log(entry)
        h.send_response(status)
        for name, value in headers.items():
            h.send_header(name, value)
        if fault is None or fault.kind != "endless":
            h.send_header("Content-Length", str(len(body)))
        if fault is not None:
            h.send_header("Connection", "close")
        h.end_headers()
        if method == "GET":
            self._busy(+1)
            try:
                if fault is not None and fault.kind == "endless":
                    h.close_connection = True
                    until = time.monotonic() + 60.0
                    while time.monotonic() < until:
                        h.wfile.write(b"\0" * fault.chunk)
                        h.wfile.flush()
                        sent += fault.chunk
                        entry.bytes_sent = sent
                        time.sleep(fault.delay)
                elif fault is not None and fault.kind in ("drop", "short"):
                    h.wfile.write(body[: len(body) // 2])
                    sent = len(body) // 2
                    h.wfile.flush()
                    h.close_connection = True
                    if fault.kind == "drop":
                        h.connection.shutdown(socket.SHUT_RDWR)
                elif fault is not None and fault.kind == "slow":
                    for i in range(0, len(body), fault.chunk):
                        time.sleep(fault.delay)
                        h.wfile.write(body[i : i + fault.chunk])
                        h.wfile.flush()
                        sent += len(body[i : i + fault.chunk])
                        entry.bytes_sent = sent
                else:
                    self._write_body(h, body, entry)
                    sent = entry.bytes_sent
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass
            finally:
                self._busy(-1)
        entry.bytes_sent = sent

    def _write_body(self, h, body: bytes, entry: Request) -> None:
        """Sends a whole body; a subclass may pace it (a bandwidth cap)."""
        h.wfile.write(body)
        entry.bytes_sent = len(body)

    def _bad_body(self, h, kind: str, headers: dict[str, str], body: bytes) -> None:
        page = b"<!DOCTYPE html><html><body><form action='/login'>Please sign in</form></body></html>"
        payload, length = body, str(len(body))
        headers = dict(headers)
        if kind == "gzip":
            payload = gzip.compress(body)
            length = str(len(payload))
            headers["Content-Encoding"] = "gzip"
        elif kind in ("html", "html-as-file"):
            payload, length = page, str(len(page))
            headers["Content-Type"] = "text/html; charset=utf-8" if kind == "html" else "application/octet-stream"
        elif kind == "cut":
            payload, length = body[: len(body) // 2], ""
        elif kind == "overlong":
            length = str(len(body) // 2)
        h.send_response(200)
        for name, value in headers.items():
            h.send_header(name, value)
        if length:
            h.send_header("Content-Length", length)
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        try:
            h.wfile.write(payload)
            h.wfile.flush()
        except OSError:
            pass

    def _handle(self, h, method: str) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


def _ranged(h, body: bytes, validators: tuple[str, ...] = ()) -> tuple[int, bytes, dict[str, str]]:
    """Returns (status, the part of `body` asked for, headers): a ``Range`` is honoured unless an
    ``If-Range`` names none of the file's current `validators` (then the whole file, 200)."""
    header = h.headers.get("Range")
    if_range = h.headers.get("If-Range")
    if if_range is not None and if_range not in validators:
        return 200, body, {}
    if header and header.startswith("bytes="):
        start_text, _, end_text = header[len("bytes=") :].partition("-")
        start = int(start_text or 0)
        end = int(end_text) if end_text else len(body) - 1
        return 206, body[start : end + 1], {"Content-Range": f"bytes {start}-{end}/{len(body)}"}
    return 200, body, {}


class FileServer(_Base):
    """Serves `files` (URL path -> bytes) over plain HTTP; 404 for anything else.

    With `ranges` (the default) it says ``Accept-Ranges: bytes`` and honours ``Range`` and
    ``If-Range`` against the file's ETag (a hash of its bytes) and Last-Modified (when it was added).
    """

    def __init__(self, files: dict[str, bytes] | None = None, *, ranges: bool = True) -> None:
        super().__init__()
        self.files: dict[str, bytes] = {}
        self.modified: dict[str, str] = {}
        self.ranges = ranges
        self._versions = 0
        for path, data in (files or {}).items():
            self.add(path, data)

    def add(self, path: str, data: bytes) -> str:
        """Serves `data` at `path` and returns its full URL."""
        key = "/" + path.lstrip("/")
        self.files[key] = data
        # Every version gets its own Last-Modified, even two within one second, as a validator must.
        self._versions += 1
        self.modified[key] = email.utils.formatdate(1_700_000_000 + self._versions, usegmt=True)
        return self.url + "/" + path.lstrip("/")

    def _handle(self, h, method: str) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(h.path).path)
        body = self.files.get(path)
        if body is None:
            self._send(h, method, 404, {}, b"not found")
            return
        headers = {"Content-Type": "application/octet-stream"}
        if not self.ranges:
            self._send(h, method, 200, headers, body)
            return
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        modified = self.modified[path]
        status, chunk, extra = _ranged(h, body, (etag, modified))
        headers.update({"Accept-Ranges": "bytes", "ETag": etag, "Last-Modified": modified, **extra})
        self._send(h, method, status, headers, chunk)


@dataclass
class _Repo:
    token: str | None = None
    revisions: dict[str, str] = field(default_factory=dict)  # name -> commit
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> filename -> bytes


class HubServer(_Base):
    """A Hugging Face Hub look-alike for ``hf_hub_download`` (point ``HF_ENDPOINT`` at `url`)."""

    def __init__(self) -> None:
        super().__init__()
        self.repos: dict[str, _Repo] = {}
        self.sha256_etags = True
        self.lying_etags: dict[str, str] = {}  # file name -> the ETag announced instead of the true one

    def clear(self) -> None:
        self.repos.clear()
        self.faults.clear()
        self.reset_log()
        self.sha256_etags = True
        self.lying_etags.clear()

    def add_file(
        self, repo_id: str, filename: str, data: bytes, *, revision: str = "main", token: str | None = None
    ) -> str:
        """Publishes `data` as `filename` at `revision` of `repo_id` (a new commit); returns the commit."""
        repo = self.repos.setdefault(repo_id, _Repo())
        if token is not None:
            repo.token = token
        old = repo.revisions.get(revision)
        files = dict(repo.files.get(old, {})) if old else {}
        files[filename] = data
        commit = hashlib.sha1(f"{repo_id}@{revision}#{len(repo.files)}#{filename}".encode()).hexdigest()
        repo.files[commit] = files
        repo.revisions[revision] = commit
        return commit

    def _handle(self, h, method: str) -> None:
        path = urllib.parse.urlsplit(h.path).path
        if "/resolve/" not in path:
            self._send(h, method, 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Not a resolve URL"}, b"")
            return
        repo_part, _, rest = path.lstrip("/").partition("/resolve/")
        repo_id = urllib.parse.unquote(repo_part)
        revision_q, _, filename_q = rest.partition("/")
        revision = urllib.parse.unquote(revision_q)
        filename = urllib.parse.unquote(filename_q)
        repo = self.repos.get(repo_id)
        if repo is None:
            self._send(h, method, 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b"")
            return
        if repo.token is not None and h.headers.get("Authorization") != f"Bearer {repo.token}":
            self._send(h, method, 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Invalid credentials"}, b"")
            return
        commit = repo.revisions.get(revision) or (revision if revision in repo.files else None)
        if commit is None:
            self._send(h, method, 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b"")
            return
        body = repo.files[commit].get(filename)
        if body is None:
            self._send(
                h,
                method,
                404,
                {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": commit},
                b"",
            )
            return
        etag = hashlib.sha256(body).hexdigest() if self.sha256_etags else hashlib.sha1(body).hexdigest()
        etag = self.lying_etags.get(filename, etag)
        status, chunk, extra = _ranged(h, body, (f'"{etag}"',))
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes", **extra}
        self._send(h, method, status, headers, chunk if method == "GET" else body)

    def downloads(self, filename: str = "") -> int:
        """Returns how many GET requests for `filename` sent a body."""
        return len(self.gets(filename))
