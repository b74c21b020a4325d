"""Collection at 1, 2, 4 and 8 gloo ranks: pl_pretrain against "every rank fetches", side by side.

A loopback HTTP server with a shared bandwidth cap (a stand-in for the link to a model store)
serves one checkpoint. For each world size, both ways run in one go:

- naive: every rank downloads the file itself into the shared folder and loads it (what a job
  does without coordination, and what SpeechBrain does for URL sources on every rank);
- pl_pretrain: `Pretrainer.collect_files(internal_ddp_handling=True)` + `load_collected()`.

It reports requests served, bytes served and wall time (from a common barrier to the last rank
done), then the failure fan-out: how long after rank 0 raises a 404 the last rank raises it too.
Writes docs/benchmarks/collect.md and docs/benchmarks/collect.png.

    python scripts/bench_collect.py                 # 64 MiB checkpoint, 400 MB/s link
    python scripts/bench_collect.py --size 16 --ranks 1 2 4
"""

from __future__ import annotations

import argparse
import http.server
import io
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time
import urllib.request

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from dist import assert_all_ok, run_ranks  # noqa: E402  (the tests' gloo harness)

CHUNK = 256 * 1024


class CappedServer:
    """Serves one file at /m/encoder.ckpt; all connections together share `bandwidth` bytes/s."""

    def __init__(self, payload: bytes, bandwidth: float) -> None:
        self.payload = payload
        self.bandwidth = bandwidth
        self.requests = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._next_free = time.monotonic()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with server._lock:
                    server.requests += 1
                if self.path != "/m/encoder.ckpt":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.payload)))
                self.end_headers()
                for start in range(0, len(server.payload), CHUNK):
                    piece = server.payload[start : start + CHUNK]
                    server._take(len(piece))
                    self.wfile.write(piece)
                    with server._lock:
                        server.bytes += len(piece)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/m"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _take(self, nbytes: int) -> None:
        # One shared schedule for every connection: the link is the bottleneck, as in real life.
        with self._lock:
            start = max(self._next_free, time.monotonic())
            self._next_free = start + nbytes / self.bandwidth
            wait = self._next_free - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def reset(self) -> None:
        self.requests = 0
        self.bytes = 0


def make_model(size_mib: int) -> torch.nn.Module:
    side = int((size_mib * 1024 * 1024 / 4) ** 0.5)
    torch.manual_seed(0)
    return torch.nn.Linear(side, side, bias=False)


def job(rank: int, mode: str, source: str, collect_in: str, size_mib: int) -> dict:
    import torch.distributed as dist

    from pl_pretrain import LocalStrategy, Pretrainer, PretrainerError

    target = make_model(size_mib)
    dist.barrier()
    started = time.time()
    try:
        if mode == "naive":
            os.makedirs(collect_in, exist_ok=True)
            path = os.path.join(collect_in, "encoder.ckpt")
            urllib.request.urlretrieve(f"{source}/encoder.ckpt", path)
            target.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            pt = Pretrainer(collect_in, {"encoder": target})
            pt.collect_files(default_source=source, internal_ddp_handling=True, local_strategy=LocalStrategy.COPY)
            pt.load_collected()
        error = None
    except PretrainerError as exc:
        error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # the naive way can fail in many ways (torn reads)
        error = f"{type(exc).__name__}: {exc}"
    return {"started": started, "finished": time.time(), "error": error, "weight0": float(target.weight.detach()[0, 0])}


def run_world(server: CappedServer, world: int, mode: str, size_mib: int, work: pathlib.Path) -> dict:
    folder = work / f"{mode}-{world}"
    shutil.rmtree(folder, ignore_errors=True)
    server.reset()
    results = assert_all_ok(run_ranks(job, world, args=(mode, server.url, str(folder), size_mib), timeout=900))
    wall = max(r["finished"] for r in results) - min(r["started"] for r in results)
    errors = [r["error"] for r in results if r["error"]]
    return {
        "world": world,
        "mode": mode,
        "requests": server.requests,
        "bytes": server.bytes,
        "wall": wall,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }


def fanout(server: CappedServer, world: int, work: pathlib.Path) -> float:
    folder = work / f"fanout-{world}"
    results = assert_all_ok(
        run_ranks(job, world, args=("pl_pretrain", server.url + "/missing", str(folder), 1), timeout=300)
    )
    assert all(r["error"] and "HTTP 404" in r["error"] for r in results), results
    return max(r["finished"] for r in results) - results[0]["finished"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="checkpoint size in MiB")
    parser.add_argument("--bandwidth", type=float, default=400.0, help="server link in MB/s, shared by all connections")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "docs" / "benchmarks")
    args = parser.parse_args()

    buffer = io.BytesIO()
    torch.save(make_model(args.size).state_dict(), buffer)
    payload = buffer.getvalue()
    server = CappedServer(payload, args.bandwidth * 1e6)
    rows, fanouts = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_collect_") as tmp:
        work = pathlib.Path(tmp)
        for world in args.ranks:
            for mode in ("naive", "pl_pretrain"):
                row = run_world(server, world, mode, args.size, work)
                rows.append(row)
                print(
                    f"{world} ranks {mode:11s} requests {row['requests']:2d} bytes {row['bytes'] / 2**20:7.1f} MiB "
                    f"wall {row['wall']:6.2f} s errors {row['errors']}",
                    flush=True,
                )
            if world > 1:
                fanouts[world] = fanout(server, world, work)
                print(f"{world} ranks failure fan-out {fanouts[world] * 1000:.0f} ms", flush=True)
    write_report(args, payload, rows, fanouts)


def write_report(args, payload: bytes, rows: list[dict], fanouts: dict[int, float]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    by = {(r["world"], r["mode"]): r for r in rows}
    lines = [
        "# Collection: pl_pretrain against every rank fetching",
        "",
        f"Checkpoint {len(payload) / 2**20:.1f} MiB, served on 127.0.0.1 through a {args.bandwidth:.0f} MB/s link shared "
        "by all connections; gloo ranks on one machine (2 cores), a shared collection folder. Wall time runs from a "
        "barrier to the last rank holding the weights. Produced by:",
        "",
        "```",
        f"python scripts/bench_collect.py --size {args.size} --bandwidth {args.bandwidth:.0f} --ranks {' '.join(map(str, args.ranks))}",
        "```",
        "",
        "| ranks | requests (naive / ours) | MiB served (naive / ours) | wall s (naive / ours) | time ratio | naive ranks that failed |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for world in args.ranks:
        n, o = by[(world, "naive")], by[(world, "pl_pretrain")]
        ratio = n["wall"] / o["wall"] if o["wall"] else float("nan")
        lines.append(
            f"| {world} | {n['requests']} / {o['requests']} | {n['bytes'] / 2**20:.0f} / {o['bytes'] / 2**20:.0f} | "
            f"{n['wall']:.2f} / {o['wall']:.2f} | {ratio:.2f}x | {n['errors']} |"
        )
    failures = [r for r in rows if r["mode"] == "naive" and r["errors"]]
    if failures:
        lines += ["", f"A naive rank's error: `{failures[0]['first_error'][:200]}`"]
    if any(r["mode"] == "pl_pretrain" and r["errors"] for r in rows):
        lines += [
            "",
            "**pl_pretrain had errors in this run:** "
            + "; ".join(r["first_error"] for r in rows if r["mode"] == "pl_pretrain" and r["errors"]),
        ]
    if fanouts:
        lines += [
            "",
            "Failure fan-out: rank 0 gets HTTP 404; time from rank 0 raising to the last rank raising the same error:",
            "",
            "| ranks | fan-out |",
            "|---:|---:|",
        ]
        lines += [f"| {w} | {s * 1000:.0f} ms |" for w, s in fanouts.items()]
    (args.out / "collect.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    worlds = args.ranks
    width = 0.38
    xs = range(len(worlds))
    for ax, field, label in ((axes[0], "bytes", "MiB served"), (axes[1], "wall", "wall time (s)")):
        for shift, mode, color in ((-width / 2, "naive", "#c44e52"), (width / 2, "pl_pretrain", "#4c72b0")):
            values = [by[(w, mode)][field] / (2**20 if field == "bytes" else 1) for w in worlds]
            ax.bar([x + shift for x in xs], values, width, label=mode, color=color)
        ax.set_xticks(list(xs), [str(w) for w in worlds])
        ax.set_xlabel("ranks")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"Collecting a {len(payload) / 2**20:.0f} MiB checkpoint over a {args.bandwidth:.0f} MB/s link")
    fig.tight_layout()
    fig.savefig(args.out / "collect.png", dpi=110)
    print(f"wrote {args.out / 'collect.md'} and {args.out / 'collect.png'}")


if __name__ == "__main__":
    main()
