"""A sharded checkpoint's shards collected at once against one by one, from a server that caps each connection.

A loopback file server (the tests' `FileServer`) paces every connection to `--bandwidth` MB/s,
as a CDN or an object store does per stream, and serves an 8-shard safetensors checkpoint. The
Pretrainer collects it (`collect_files`, fresh folder each time) with
``FetchConfig(parallel_shards=N)`` for N in 1 (one by one), 2, 4 and 8 (the default); the median of
`--repeats` runs is reported, with the ratio to one by one (target: <= 0.3x at 8). The weights
are loaded and checked after every run. Writes docs/benchmarks/shards.md and shards.png.

    python scripts/bench_shards.py                  # 8 shards of 4 MiB, 8 MB/s per connection
    python scripts/bench_shards.py --shard-mib 2 --bandwidth 16 --repeats 1
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from servers import FileServer  # noqa: E402  (the tests' loopback server)

PIECE = 64 * 1024


class CappedFileServer(FileServer):
    """A `FileServer` that sends each body at most `bandwidth` bytes/s, per connection."""

    def __init__(self, bandwidth: float) -> None:
        super().__init__()
        self.bandwidth = bandwidth

    def _write_body(self, h, body: bytes, entry) -> None:
        start = time.monotonic()
        for offset in range(0, len(body), PIECE):
            due = start + offset / self.bandwidth
            if due > time.monotonic():
                time.sleep(due - time.monotonic())
            h.wfile.write(body[offset : offset + PIECE])
            entry.bytes_sent = offset + len(body[offset : offset + PIECE])


class Model(torch.nn.Module):
    def __init__(self, shards: int, shard_mib: float) -> None:
        super().__init__()
        rows = max(1, int(shard_mib * 2**20 / 4 / 1024))
        torch.manual_seed(0)
        self.blocks = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(rows, 1024)) for _ in range(shards))


def publish(server: FileServer, shards: int, shard_mib: float, work: pathlib.Path) -> tuple[Model, int]:
    import huggingface_hub

    model = Model(shards, shard_mib)
    folder = work / "published"
    folder.mkdir()
    huggingface_hub.save_torch_state_dict(model.state_dict(), folder, max_shard_size=int(shard_mib * 2**20 * 1.05))
    files = sorted(folder.iterdir())
    assert sum(f.name.endswith(".safetensors") for f in files) == shards, [f.name for f in files]
    for f in files:
        server.add(f"m/{f.name}", f.read_bytes())
    return model, sum(f.stat().st_size for f in files)


def collect_once(url: str, folder: pathlib.Path, parallel: int, shards: int, shard_mib: float, source: Model) -> float:
    from pl_pretrain import FetchConfig, Pretrainer

    shutil.rmtree(folder, ignore_errors=True)
    target = Model(shards, shard_mib)
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    pt = Pretrainer(folder, {"model": target}, paths={"model": f"{url}/m/model.safetensors.index.json"})
    started = time.perf_counter()
    pt.collect_files(fetch_config=FetchConfig(parallel_shards=parallel, progress=False))
    took = time.perf_counter() - started
    pt.load_collected(log_report=False)
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters(), strict=True)), (
        "wrong weights"
    )
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-mib", type=float, default=4.0, help="size of one shard in MiB")
    parser.add_argument("--bandwidth", type=float, default=8.0, help="MB/s per connection")
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "docs" / "benchmarks")
    args = parser.parse_args()

    rows = []
    with CappedFileServer(args.bandwidth * 1e6) as server, tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        work = pathlib.Path(tmp)
        source, total = publish(server, args.shards, args.shard_mib, work)
        for parallel in args.parallel:
            server.reset_log()
            times = [
                collect_once(server.url, work / "c", parallel, args.shards, args.shard_mib, source)
                for _ in range(args.repeats)
            ]
            rows.append({"parallel": parallel, "median": statistics.median(times), "most_active": server.most_active})
            print(
                f"parallel_shards={parallel}: median {rows[-1]['median']:.2f} s ({', '.join(f'{t:.2f}' for t in times)})"
            )
    write_report(args, total, rows)


def write_report(args, total: int, rows: list[dict]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    base = next((r["median"] for r in rows if r["parallel"] == 1), rows[0]["median"])
    command = (
        f"python scripts/bench_shards.py --shards {args.shards} --shard-mib {args.shard_mib:g} "
        f"--bandwidth {args.bandwidth:g} --parallel {' '.join(map(str, args.parallel))} --repeats {args.repeats}"
    )
    lines = [
        "# Sharded checkpoints: shards collected at once against one by one",
        "",
        f"{args.shards} safetensors shards ({total / 2**20:.1f} MiB with the index) served on 127.0.0.1 by a server "
        f"that paces each connection to {args.bandwidth:g} MB/s (as a CDN or an object store does per stream); "
        "`Pretrainer.collect_files` into a fresh folder with `FetchConfig(parallel_shards=N)`, median of "
        f"{args.repeats} runs, the weights checked after each; one machine, 2 shared cores. Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        "| parallel_shards | collection s | vs one by one | most requests served at once |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['parallel']} | {r['median']:.2f} | {r['median'] / base:.2f}x | {r['most_active']} |" for r in rows]
    lines += [
        "",
        "The target is at most 0.3x one by one at the default of 8. A link whose bandwidth is shared by all "
        "connections gains nothing from more of them: this helps where each stream is capped, not the pipe.",
    ]
    (args.out / "shards.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([str(r["parallel"]) for r in rows], [r["median"] for r in rows], color="#4c72b0")
    for i, r in enumerate(rows):
        ax.text(i, r["median"], f"{r['median'] / base:.2f}x", ha="center", va="bottom")
    ax.set_xlabel("FetchConfig(parallel_shards=)")
    ax.set_ylabel("collection time (s)")
    ax.set_title(f"{args.shards} shards, {args.bandwidth:g} MB/s per connection")
    fig.tight_layout()
    fig.savefig(args.out / "shards.png", dpi=110)
    print(f"wrote {args.out / 'shards.md'} and {args.out / 'shards.png'}")


if __name__ == "__main__":
    main()
