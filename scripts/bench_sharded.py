"""Benchmark: pretrained weights into an FSDP2-sharded model, four ways, 2 and 4 ranks on one node.

One checkpoint (default 208 MiB of fp32: 13 linear layers of 2047 x 2048, so that dim-0 shards
are uneven over 2 and 4 ranks), saved with ``torch.save``. For each world size, side by side:

- ``every-rank-full``: every rank reads the whole file into memory (``torch.load``) and
  ``set_model_state_dict(model, sd, StateDictOptions(full_state_dict=True))`` keeps its shards;
- ``broadcast-rank0``: rank 0 reads the file (memory-mapped), the others pass ``{}``, and
  ``set_model_state_dict(..., StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))``
  broadcasts every tensor (what Lightning and accelerate do);
- ``ours``: ``torch_parameter_transfer(model, path)``: each rank copies only its local slice of
  each tensor from the memory-mapped file into ``to_local()``;
- ``ours-unsharded``: the same call into the same model, not sharded (the module DDP would wrap:
  every rank holds every parameter; loaded before wrapping, as the callback does).

Each run starts fresh processes (gloo over a ``file://`` store), builds the model (sharded on the
meta device, then ``to_empty`` and every page written, as after an initialisation), then the
parent drops the page cache (``echo 1 > /proc/sys/vm/drop_caches``, as root; otherwise
``posix_fadvise(DONTNEED)`` on the file) and releases the ranks, which meet at a barrier and
time the load alone. Per rank:

- load time (the run's figure is the slowest rank);
- private memory: peak ``RssAnon`` minus the value before, sampled every millisecond;
- file pages mapped: peak ``RssFile`` minus the value before (the file's pages this rank mapped);
- tensor bytes through the process group: a ``TorchDispatchMode`` sees every ``c10d`` and
  ``_c10d_functional`` op (``torch.distributed`` calls and DTensor's collectives alike) and adds
  up the bytes of their tensors.

Every run checks that every rank's shards hold the file's values. Writes
``docs/benchmarks/sharded.md``, ``sharded.png`` and ``sharded.json``. Not a test: the figures depend
on the machine. Rerun:

    python scripts/bench_sharded.py                   # 208 MiB, 2 and 4 ranks, 2 runs of each
    python scripts/bench_sharded.py --blocks 26 --ranks 2 --repeats 1
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MiB = 1024**2
ROWS, COLS = 2047, 2048  # an odd number of rows: dim-0 shards over 2 and 4 ranks are uneven
VARIANTS = ["every-rank-full", "broadcast-rank0", "ours", "ours-unsharded"]
DESCRIPTION = {
    "every-rank-full": "every rank `torch.load`s the file, `set_model_state_dict(full_state_dict=True)`",
    "broadcast-rank0": "rank 0 loads (mmap), `set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`",
    "ours": "`torch_parameter_transfer(model, path)`: each rank copies its slices from the mapped file",
    "ours-unsharded": "the same into the model unsharded (as under DDP, before wrapping)",
}


def build(blocks: int, sharded: bool):
    """Returns the benchmark model, sharded over every rank or not, every parameter allocated and written."""
    import torch

    with torch.device("meta"):
        model = torch.nn.Sequential(*(torch.nn.Linear(COLS, ROWS) for _ in range(blocks)))
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            (p.to_local() if hasattr(p, "to_local") else p).fill_(0.5)  # every page faulted in now
    return model


def status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile"):
                out[name] = int(value.split()[0])
    return out


class Sampler(threading.Thread):
    """Samples RssAnon and RssFile about every millisecond; keeps the peaks."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.peak = status_kib()

    def run(self) -> None:
        while not self.stop.is_set():
            self.take()
            time.sleep(0.001)

    def take(self) -> None:
        for name, value in status_kib().items():
            self.peak[name] = max(self.peak[name], value)


def traffic_counter():
    """Returns a dispatch mode that adds up the tensor bytes of every collective while active."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Traffic(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace in ("c10d", "_c10d_functional"):
                for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
                    if isinstance(leaf, torch.Tensor):
                        self.bytes += leaf.numel() * leaf.element_size()
            return func(*args, **(kwargs or {}))

    return Traffic()


def child(spec: dict[str, Any]) -> None:
    """One rank of one run: build, wait for the parent's go, load, measure, check; rank 0 prints every rank's figures."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from pl_pretrain import torch_parameter_transfer

    variant, rank, world = spec["variant"], spec["rank"], spec["world"]
    dist.init_process_group(
        "gloo", init_method=spec["store"], rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    path = spec["path"]
    model = build(spec["blocks"], sharded=variant != "ours-unsharded")

    def load() -> None:
        if variant == "every-rank-full":
            state = torch.load(path, map_location="cpu", weights_only=True)
            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        elif variant == "broadcast-rank0":
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True) if rank == 0 else {}
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(model, state, options=options)
        else:
            torch_parameter_transfer(model, path)

    gc.collect()
    print("READY", flush=True)
    sys.stdin.readline()  # the parent drops the page cache meanwhile
    dist.barrier()
    sampler, traffic = Sampler(), traffic_counter()
    before = status_kib()
    sampler.start()
    start = time.perf_counter()
    with traffic:
        load()
    wall = time.perf_counter() - start
    sampler.take()
    sampler.stop.set()
    sampler.join()
    figures = {
        "rank": rank,
        "wall_s": wall,
        "private_peak_kib": sampler.peak["RssAnon"] - before["RssAnon"],
        "file_peak_kib": sampler.peak["RssFile"] - before["RssFile"],
        "pg_tensor_bytes": traffic.bytes,
        "correct": _correct(model, path),
    }
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, figures)
    if rank == 0:
        print(json.dumps(everyone), flush=True)
    dist.destroy_process_group()


def _correct(model: Any, path: str) -> bool:
    """True when this rank's local parameters hold the file's values (first and last layer)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for name in ("0.weight", f"{len(model) - 1}.bias"):
        tensor = model.state_dict(keep_vars=True)[name]
        if hasattr(tensor, "to_local"):
            local = tensor.to_local()
            rows = (tensor.shape[0] + torch.distributed.get_world_size() - 1) // torch.distributed.get_world_size()
            first = rows * torch.distributed.get_rank()
            want = state[name][first : first + local.shape[0]]
        else:
            local, want = tensor, state[name]
        if not torch.equal(local.detach(), want):
            return False
    return True


# --------------------------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------------------------


def drop_page_cache(path: pathlib.Path) -> str:
    """Drops the page cache (all of it as root, else the file's pages); returns how."""
    try:
        os.sync()
        pathlib.Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "echo 1 > /proc/sys/vm/drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "posix_fadvise(DONTNEED) on the file (drop_caches not permitted)"


def one_run(
    variant: str, world: int, blocks: int, path: pathlib.Path, folder: pathlib.Path, n: int
) -> tuple[list, str]:
    store = folder / f"store-{variant}-{world}-{n}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    env["OMP_NUM_THREADS"] = "1"  # as torchrun sets it: ranks share the cores
    procs = []
    for rank in range(world):
        spec = {
            "variant": variant,
            "rank": rank,
            "world": world,
            "blocks": blocks,
            "path": str(path),
            "store": f"file://{store}",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            )
        )  # fmt: skip
    for proc in procs:
        line = proc.stdout.readline()
        if line.strip() != "READY":
            raise SystemExit(f"a rank did not start: {line!r}{proc.stdout.read()}")
    how = drop_page_cache(path)
    time.sleep(0.3)
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outs = [proc.communicate(timeout=600)[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise SystemExit(f"{variant} at {world} ranks failed:\n" + "\n".join(outs))
    figures = json.loads(outs[0].strip().splitlines()[-1])
    if not all(f["correct"] for f in figures):
        raise SystemExit(f"{variant} at {world} ranks loaded wrong values: {figures}")
    return figures, how


def make_file(blocks: int, path: pathlib.Path) -> int:
    import torch

    torch.manual_seed(0)
    state = {}
    for i in range(blocks):
        state[f"{i}.weight"] = torch.randn(ROWS, COLS)
        state[f"{i}.bias"] = torch.randn(ROWS)
    torch.save(state, path)
    size = sum(t.nbytes for t in state.values())
    del state
    gc.collect()
    return size


def summarise(runs: list[list[dict]]) -> dict[str, float]:
    walls = [max(f["wall_s"] for f in run) for run in runs]
    last = runs[-1]
    return {
        "wall_best_s": min(walls),
        "wall_median_s": statistics.median(walls),
        "private_max_mib": max(f["private_peak_kib"] for run in runs for f in run) / 1024,
        "file_max_mib": max(f["file_peak_kib"] for run in runs for f in run) / 1024,
        "file_rank0_mib": last[0]["file_peak_kib"] / 1024,
        "pg_bytes_max": max(f["pg_tensor_bytes"] for run in runs for f in run),
    }


def write_report(results: dict, size: int, args: argparse.Namespace, how: str, out: pathlib.Path, command: str) -> None:
    file_mib = size / MiB
    lines = [
        "# Sharded-model load benchmark (FSDP2, one node)",
        "",
        f"Checkpoint: {file_mib:.0f} MiB of fp32 ({args.blocks} linear layers of {ROWS} x {COLS} with bias, "
        f"torch.save zip); every layer `fully_shard`ed over all ranks, so dim-0 shards are uneven ({ROWS} rows).  ",
        f"Machine: {_machine()}.  ",
        f"Run: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, `{command}`, "
        f"{args.repeats} run(s) of each variant, each in fresh processes, page cache dropped before each load "
        f"({how}). Load average (1 min) {args.load[0]:.1f} at the start, {args.load[1]:.1f} at the end: the "
        "machine is shared, 2 cores for up to 4 ranks.",
        "",
        "Time: the slowest rank's load, best / median of the runs. Memory and pages: the worst rank of any run.",
        "",
        "| ranks | variant | what it does | load time, best / median | private memory (peak) | "
        "file pages mapped, worst rank | tensor bytes over the process group, worst rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for world, per_variant in results.items():
        for variant, s in per_variant.items():
            lines.append(
                f"| {world} | {variant} | {DESCRIPTION[variant]} | {s['wall_best_s']:.3f} s / {s['wall_median_s']:.3f} s | "
                f"{s['private_max_mib']:.1f} MiB | {s['file_max_mib']:.1f} MiB ({100 * s['file_max_mib'] / file_mib:.0f} %) | "
                f"{s['pg_bytes_max'] / MiB:.1f} MiB |"
            )
    lines += [
        "",
        "## Targets (issue 13)",
        "",
        "| ranks | target | measured (best / median) | met |",
        "|---|---|---|---|",
    ]
    for world, s in results.items():
        ours, bcast, dense = s["ours"], s["broadcast-rank0"], s["ours-unsharded"]
        r_b = (ours["wall_best_s"] / bcast["wall_best_s"], ours["wall_median_s"] / bcast["wall_median_s"])
        r_d = (ours["wall_best_s"] / dense["wall_best_s"], ours["wall_median_s"] / dense["wall_median_s"])
        share = 100 * ours["file_max_mib"] / file_mib
        bound = 100 / int(world) + 10
        rows = [
            ("ours <= 0.6x broadcast-from-rank-0", f"{r_b[0]:.2f}x / {r_b[1]:.2f}x", r_b[0] <= 0.6),
            ("ours <= 1.3x the unsharded load", f"{r_d[0]:.2f}x / {r_d[1]:.2f}x", r_d[0] <= 1.3),
            ("private memory <= 16 MiB per rank", f"{ours['private_max_mib']:.1f} MiB", ours["private_max_mib"] <= 16),
            (f"file pages per rank <= 1/{world} + 10 % ({bound:.0f} %)", f"{share:.1f} %", share <= bound),
            ("0 tensor bytes over the process group", f"{ours['pg_bytes_max']} B", ours["pg_bytes_max"] == 0),
        ]
        lines += [f"| {world} | {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in rows]
    lines += [
        "",
        "## How it is measured",
        "",
        "- Each run is a set of fresh processes on gloo; each builds its model (sharded on the meta device, then "
        "`to_empty` and every local page written) before the clock, then waits; the parent drops the page cache and "
        "releases them; they meet at a barrier and time the load with `time.perf_counter`.",
        "- Private memory is `RssAnon` from `/proc/self/status`, sampled every millisecond by a thread; file pages "
        "mapped are `RssFile`, the same way (a memory-mapped file's pages this rank touched; `torch.load` without "
        "mmap reads into private memory instead).",
        "- Tensor bytes through the process group: a `TorchDispatchMode` sees every `c10d` and `_c10d_functional` "
        "op in the rank and adds up its tensors' bytes (a broadcast counts the tensor once on every rank).",
        "- After the load every rank checks its shards of the first and last layers against the file.",
        "- 2 shared cores for up to 4 ranks: compare the variants of one world size, not absolute times.",
        "",
        "## Rerun",
        "",
        "    python scripts/bench_sharded.py                     # as above",
        "    python scripts/bench_sharded.py --blocks 26 --ranks 2 4 --repeats 3",
        "",
    ]
    (out / "sharded.md").write_text("\n".join(lines))


def plot(results: dict, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    worlds = list(results)
    width = 0.8 / len(VARIANTS)
    for i, variant in enumerate(VARIANTS):
        xs = [w + (i - 1.5) * width for w in range(len(worlds))]
        axes[0].bar(xs, [results[w][variant]["wall_best_s"] for w in worlds], width, label=variant)
        axes[1].bar(xs, [results[w][variant]["private_max_mib"] for w in worlds], width, label=variant)
        axes[2].bar(xs, [results[w][variant]["pg_bytes_max"] / MiB for w in worlds], width, label=variant)
    for ax, title in zip(
        axes, ["load time (s, best)", "private memory per rank (MiB)", "tensor MiB over the process group"], strict=True
    ):
        ax.set_xticks(range(len(worlds)), [f"{w} ranks" for w in worlds])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sharded.png", dpi=110)


def _machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=13, help="linear layers of 2047 x 2048 (16 MiB each)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS, help="a subset, to try one")
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    command = "python scripts/bench_sharded.py " + " ".join(sys.argv[1:])
    start_load = os.getloadavg()[0]
    results: dict[str, dict[str, dict]] = {}
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sharded-") as tmp:
        folder = pathlib.Path(tmp)
        path = folder / "model.ckpt"
        size = make_file(args.blocks, path)
        print(f"checkpoint: {size / MiB:.0f} MiB", flush=True)
        how = ""
        for world in args.ranks:
            runs: dict[str, list] = {v: [] for v in args.variants}
            for n in range(args.repeats):
                for variant in args.variants:  # interleaved: a noisy minute hurts every variant alike
                    figures, how = one_run(variant, world, args.blocks, path, folder, n)
                    runs[variant].append(figures)
                    slowest = max(f["wall_s"] for f in figures)
                    print(f"  {world} ranks, run {n + 1}: {variant:<16} {slowest:6.3f} s  "
                          f"private {max(f['private_peak_kib'] for f in figures) / 1024:7.1f} MiB  "
                          f"pages {max(f['file_peak_kib'] for f in figures) / 1024:7.1f} MiB  "
                          f"pg {max(f['pg_tensor_bytes'] for f in figures) / MiB:7.1f} MiB", flush=True)  # fmt: skip
            results[str(world)] = {v: summarise(r) for v, r in runs.items()}
            raw[str(world)] = runs
    args.load = (start_load, os.getloadavg()[0])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sharded.json").write_text(json.dumps({"size": size, "summary": results, "runs": raw}, indent=1))
    if args.variants == VARIANTS:
        write_report(results, size, args, how, args.out, command)
        plot(results, args.out)
        print((args.out / "sharded.md").read_text())


if __name__ == "__main__":
    main()
