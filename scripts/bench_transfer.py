"""Benchmark: parameter transfer, SpeechBrain-style against pl_pretrain, wall time and private memory.

Builds a model and its checkpoint of a given size (default 1 GiB of fp32 parameters), saved both
with ``torch.save`` (.ckpt) and as .safetensors, then measures side by side, each run in a fresh
process with a warm page cache:

- ``floor``: one copy of the same bytes, already in memory, into the parameters (the best possible);
- ``floor-bf16``: the conversion floor: the same fp32 tensors, already in memory, ``copy_``'d into
  bf16 parameters (allocated and written before the clock): the least a converting load can do;
- ``speechbrain-ckpt``: SpeechBrain's default hook, ``model.load_state_dict(torch.load(path), strict=False)``;
- ``naive-safetensors``: ``model.load_state_dict(safetensors.torch.load_file(path), strict=False)``;
- ``ours-ckpt`` / ``ours-safetensors``: ``pl_pretrain.torch_parameter_transfer(model, path)``;
- ``ours-ckpt-bf16``: the same into bf16 parameters (``TransferOptions(dtype="bfloat16")``).

Then it starts 4 processes on this node that load the same file at once (the page cache evicted
first, so that its growth is what the 4 ranks together cost), for the SpeechBrain path and ours.

Memory is measured honestly: a thread in each process reads ``RssAnon`` (private anonymous
resident memory) from /proc/self/status about every millisecond, from just before the load until
just after it; "private added" is the peak minus the value before. The model's own parameters are
allocated (and touched) before that and are not counted. File pages mapped by mmap are page cache,
shared by every process on the node: they show in ``RssFile``, not in ``RssAnon``. For the 4-rank
run the parent also samples /proc/meminfo (AnonPages, Cached) for the whole node.

Writes ``docs/benchmarks/transfer.md`` (tables, targets, how to rerun), ``transfer.png`` (plot)
and ``transfer.json`` (raw figures). Not a test: it asserts nothing, and the figures depend on
the machine; rerun it on yours:

    python scripts/bench_transfer.py                  # 1 GiB, 5 runs of each variant
    python scripts/bench_transfer.py --size 256MiB --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import pathlib
import platform
import re
import shutil
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

GiB = 1024**3
MiB = 1024**2
DIM = 2048  # a block is a DIM x DIM linear layer with bias and a LayerNorm: 4 tensors, ~16 MiB

SINGLE = [
    "floor",
    "floor-bf16",
    "speechbrain-ckpt",
    "naive-safetensors",
    "ours-ckpt",
    "ours-safetensors",
    "ours-ckpt-into-bf16",
    "ours-ckpt-bf16",
]
CONCURRENT = ["speechbrain-ckpt", "ours-ckpt", "ours-safetensors"]
DESCRIPTION = {
    "floor": "copy of the same bytes from memory into the parameters",
    "floor-bf16": "fp32 -> bf16 `copy_` of the same tensors from memory into bf16 parameters (the conversion floor)",
    "speechbrain-ckpt": "`load_state_dict(torch.load(path), strict=False)` (SpeechBrain's default hook)",
    "naive-safetensors": "`load_state_dict(safetensors.torch.load_file(path), strict=False)`",
    "ours-ckpt": "`torch_parameter_transfer(model, path)` on the .ckpt",
    "ours-safetensors": "`torch_parameter_transfer(model, path)` on the .safetensors",
    "ours-ckpt-into-bf16": "the fp32 .ckpt into a bf16 model (converted in the copy), like the conversion floor",
    "ours-ckpt-bf16": 'the fp32 .ckpt into an fp32 model made bf16 by the load, `TransferOptions(dtype="bfloat16")`',
}


# --------------------------------------------------------------------------------------------
# The model, the same in the parent and in every child
# --------------------------------------------------------------------------------------------


def blocks_for(size: int) -> int:
    """Returns how many blocks make a model of about `size` bytes of fp32 parameters."""
    return max(1, round(size / ((DIM * DIM + 3 * DIM) * 4)))


def build_model(blocks: int):
    """Returns the benchmark model with every parameter allocated and touched (as after init)."""
    import torch

    with torch.device("meta"):
        model = torch.nn.Sequential(
            *(torch.nn.Sequential(torch.nn.Linear(DIM, DIM), torch.nn.LayerNorm(DIM)) for _ in range(blocks))
        )
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)  # fault every page in now, as a real initialisation does
    return model


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMG]i?B?|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1GiB, 256MiB or 0.5GiB")
    unit = (match.group(2) or "GiB").upper().rstrip("B").rstrip("I") or "B"
    return int(float(match.group(1)) * {"B": 1, "K": 1024, "M": MiB, "G": GiB}[unit])


# --------------------------------------------------------------------------------------------
# Measuring inside a process
# --------------------------------------------------------------------------------------------


def status_kib(*fields: str) -> dict[str, int]:
    """Returns the named /proc/self/status fields in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in fields:
                out[name] = int(value.split()[0])
    return out


class Sampler(threading.Thread):
    """Samples RssAnon and RssFile of this process about every millisecond; keeps the peaks."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.peak = status_kib("RssAnon", "RssFile")
        self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.take()
            time.sleep(0.001)

    def take(self) -> None:
        now = status_kib("RssAnon", "RssFile")
        self.samples += 1
        for name, value in now.items():
            self.peak[name] = max(self.peak[name], value)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one variant in this (fresh) process; returns its wall time and memory figures."""
    import torch

    variant, blocks = spec["variant"], spec["blocks"]
    ckpt, safetensors_path = spec["ckpt"], spec["safetensors"]
    model = build_model(blocks)
    source = None
    if variant in ("floor-bf16", "ours-ckpt-into-bf16"):
        model = model.to(torch.bfloat16)  # allocated and written before the clock, as the floor's fp32 model
    if variant.startswith("floor"):
        source = torch.load(ckpt, map_location="cpu", weights_only=True)  # in private memory, faulted in
    if variant == "ours-ckpt-bf16":
        from pl_pretrain import TransferOptions

        options = TransferOptions(dtype="bfloat16")

    def run() -> None:
        if variant.startswith("floor"):
            with torch.no_grad():
                for name, tensor in model.state_dict(keep_vars=True).items():
                    tensor.copy_(source[name])
        elif variant == "speechbrain-ckpt":
            model.load_state_dict(torch.load(ckpt, map_location="cpu"), strict=False)
        elif variant == "naive-safetensors":
            from safetensors.torch import load_file

            model.load_state_dict(load_file(safetensors_path), strict=False)
        elif variant == "ours-ckpt":
            from pl_pretrain import torch_parameter_transfer

            torch_parameter_transfer(model, ckpt)
        elif variant == "ours-safetensors":
            from pl_pretrain import torch_parameter_transfer

            torch_parameter_transfer(model, safetensors_path)
        elif variant == "ours-ckpt-into-bf16":
            from pl_pretrain import torch_parameter_transfer

            torch_parameter_transfer(model, ckpt)
        elif variant == "ours-ckpt-bf16":
            from pl_pretrain import torch_parameter_transfer

            torch_parameter_transfer(model, ckpt, options)
        else:
            raise SystemExit(f"unknown variant {variant}")

    # Imports are paid before the clock starts, by every variant alike.
    import safetensors.torch  # noqa: F401

    import pl_pretrain  # noqa: F401

    gc.collect()
    if spec.get("wait"):
        print("READY", flush=True)
        sys.stdin.readline()
    sampler = Sampler()
    before = status_kib("RssAnon", "RssFile")
    sampler.start()
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    sampler.take()
    sampler.stop.set()
    sampler.join()
    after = status_kib("RssAnon", "RssFile")
    first = model[0][0].weight
    check = float(first[0, :8].detach().float().sum()) + float(model[-1][1].bias[-8:].detach().float().sum())
    return {
        "variant": variant,
        "wall_s": wall,
        "anon_before_kib": before["RssAnon"],
        "anon_peak_added_kib": sampler.peak["RssAnon"] - before["RssAnon"],
        "anon_after_added_kib": after["RssAnon"] - before["RssAnon"],
        "file_peak_added_kib": sampler.peak["RssFile"] - before["RssFile"],
        "samples": sampler.samples,
        "check": check,
        "dtype": str(first.dtype),
    }


# --------------------------------------------------------------------------------------------
# The parent: files, runs, tables, plot
# --------------------------------------------------------------------------------------------


def meminfo_kib() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, value = line.partition(":")
            out[name] = int(value.split()[0])
    return out


def warm(path: pathlib.Path) -> None:
    """Reads `path` once so that its pages are in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(64 * MiB):
            pass


def evict(path: pathlib.Path) -> None:
    """Drops `path`'s clean pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_files(blocks: int, folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, float]:
    """Returns (.ckpt, .safetensors, expected check value) of a random model with `blocks` blocks."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_model(blocks)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    state = model.state_dict()
    ckpt, st = folder / "model.ckpt", folder / "model.safetensors"
    torch.save(state, ckpt)
    save_file(state, str(st))
    check = float(model[0][0].weight[0, :8].detach().sum()) + float(model[-1][1].bias[-8:].detach().sum())
    del model, state
    gc.collect()
    return ckpt, st, check


def spawn(spec: dict[str, Any], *, wait: bool = False) -> subprocess.Popen:
    spec = {**spec, "wait": wait}
    return subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        stdin=subprocess.PIPE if wait else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))},
    )


def result_of(proc: subprocess.Popen) -> dict[str, Any]:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"a benchmark process failed (exit {proc.returncode}); its output:\n{out}")
    return json.loads(out.strip().splitlines()[-1])


def run_single(spec: dict[str, Any], files: list[pathlib.Path], repeats: int, expected: float) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {v: [] for v in SINGLE}
    for round_ in range(repeats):
        for variant in SINGLE:  # interleaved, so that a noisy minute hurts every variant alike
            for path in files:
                warm(path)
            result = result_of(spawn({**spec, "variant": variant}))
            tolerance = 0.2 if variant.endswith("bf16") else 1e-4
            if abs(result["check"] - expected) > tolerance:
                raise SystemExit(f"{variant} loaded wrong values: {result['check']} != {expected}")
            results[variant].append(result)
            print(
                f"  round {round_ + 1}/{repeats} {variant:<18} {result['wall_s']:7.3f} s  "
                f"private +{result['anon_peak_added_kib'] / 1024:8.1f} MiB",
                flush=True,
            )
    return results


def run_concurrent(spec: dict[str, Any], variant: str, path: pathlib.Path, ranks: int) -> dict[str, Any]:
    """Returns node-wide figures for `ranks` processes loading `path` at once from a cold page cache."""
    procs = [spawn({**spec, "variant": variant}, wait=True) for _ in range(ranks)]
    for proc in procs:
        line = proc.stdout.readline()
        if line.strip() != "READY":
            raise SystemExit(f"a rank did not start: {line!r}{proc.stdout.read()}")
    evict(path)
    time.sleep(0.5)
    before = meminfo_kib()
    peaks = dict(before)
    start = time.perf_counter()
    for proc in procs:
        proc.stdin.write("\n")
        proc.stdin.flush()
    while any(proc.poll() is None for proc in procs):
        now = meminfo_kib()
        for name in ("AnonPages", "Cached"):
            peaks[name] = max(peaks[name], now[name])
        peaks["used"] = max(peaks.get("used", 0), now["MemTotal"] - now["MemAvailable"])
        time.sleep(0.005)
    wall = time.perf_counter() - start
    results = [result_of(proc) for proc in procs]
    return {
        "variant": variant,
        "ranks": ranks,
        "wall_s": wall,
        "rank_wall_s": [r["wall_s"] for r in results],
        "sum_private_peak_added_kib": sum(r["anon_peak_added_kib"] for r in results),
        "node_anon_peak_added_kib": peaks["AnonPages"] - before["AnonPages"],
        "node_cache_peak_added_kib": peaks["Cached"] - before["Cached"],
        "node_used_peak_added_kib": peaks["used"] - (before["MemTotal"] - before["MemAvailable"]),
        "checks": [r["check"] for r in results],
    }


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as info:
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    import torch

    mem = meminfo_kib()["MemTotal"] / 1024**2
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def fmt_mib(kib: float) -> str:
    return f"{kib / 1024:,.1f}"


def report(args: argparse.Namespace, size: int, single: dict, concurrent: list, out: pathlib.Path, command: str) -> str:
    med = {v: statistics.median(r["wall_s"] for r in rs) for v, rs in single.items()}
    best = {v: min(r["wall_s"] for r in rs) for v, rs in single.items()}
    peak = {v: max(r["anon_peak_added_kib"] for r in rs) for v, rs in single.items()}
    file_peak = {v: statistics.median(r["file_peak_added_kib"] for r in rs) for v, rs in single.items()}
    size_kib = size / 1024

    def ratio(a: str, b: str, invert: bool = False) -> str:
        # best-of-N against best-of-N, then median against median
        x, y = (best[b] / best[a], med[b] / med[a]) if invert else (best[a] / best[b], med[a] / med[b])
        return f"{x:.2f}x / {y:.2f}x"

    lines = [
        "# Parameter transfer benchmark",
        "",
        f"Checkpoint: {size / GiB:.2f} GiB of fp32 parameters ({args.blocks} blocks of a {DIM}x{DIM} linear layer "
        f"with bias and a LayerNorm, {args.blocks * 4} tensors), saved as .ckpt (torch.save) and .safetensors.  ",
        f"Machine: {machine()}.  ",
        f"Run: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, `{command}`, {args.repeats} runs of each "
        "variant, interleaved, each in a fresh process, page cache warm. Load average (1 min) "
        f"{args.load[0]:.1f} at the start, {args.load[1]:.1f} at the end: the machine is shared.",
        "",
        "Times are given as best of the runs / median of the runs. Noise on a shared machine only ever adds "
        "time, so the best run is the estimate of what a load costs (as `timeit` advises); the median shows "
        "how much a busy machine adds. Ratios compare best with best and median with median.",
        "",
        "## One process",
        "",
        "| variant | what it does | wall time, best / median | speed-up vs SpeechBrain | time vs copy floor | "
        "private memory added (peak, worst run) | % of checkpoint | file pages mapped (page cache, shared) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in SINGLE:
        lines.append(
            f"| {v} | {DESCRIPTION[v]} | {best[v]:.3f} s / {med[v]:.3f} s | {ratio(v, 'speechbrain-ckpt', invert=True)} | "
            f"{ratio(v, 'floor')} | {fmt_mib(peak[v])} MiB | {100 * peak[v] / size_kib:.2f} % | "
            f"{fmt_mib(file_peak[v])} MiB |"
        )
    lines += [
        "",
        "Against the conversion floor (`floor-bf16`, best / median): `ours-ckpt-into-bf16` "
        f"{ratio('ours-ckpt-into-bf16', 'floor-bf16')}, `ours-ckpt-bf16` {ratio('ours-ckpt-bf16', 'floor-bf16')}. "
        "`ours-ckpt-into-bf16` does what the floor does, from the mapped file. `ours-ckpt-bf16` converts an fp32 model "
        "to bf16 while loading: each parameter is replaced by a "
        "new, empty bf16 tensor that the copy fills from the file, one tensor at a time, so it pays for "
        "fresh memory pages and the conversion, not for a second full copy (its private memory column).",
    ]
    ours = ["ours-ckpt", "ours-safetensors"]
    speedups = {v: (best["speechbrain-ckpt"] / best[v], med["speechbrain-ckpt"] / med[v]) for v in ours}
    floors = {v: (best[v] / best["floor"], med[v] / med["floor"]) for v in ours}
    private = {v: 100 * peak[v] / size_kib for v in ours}
    conversion = (best["ours-ckpt-into-bf16"] / best["floor-bf16"], med["ours-ckpt-into-bf16"] / med["floor-bf16"])
    realloc = (best["ours-ckpt-bf16"] / best["floor-bf16"], med["ours-ckpt-bf16"] / med["floor-bf16"])
    targets = [
        (
            ">= 4x faster than the SpeechBrain-style path (warm cache)",
            ", ".join(f"{v}: {a:.1f}x / {b:.1f}x" for v, (a, b) in speedups.items()),
            _verdict([a >= 4 for a, _ in speedups.values()], [b >= 4 for _, b in speedups.values()]),
        ),
        (
            "within 2x of the copy floor",
            ", ".join(f"{v}: {a:.2f}x / {b:.2f}x" for v, (a, b) in floors.items()),
            _verdict([a <= 2 for a, _ in floors.values()], [b <= 2 for _, b in floors.values()]),
        ),
        (
            "fp32 file into bf16 parameters within 1.5x of the conversion floor",
            f"ours-ckpt-into-bf16: {conversion[0]:.2f}x / {conversion[1]:.2f}x (ours-ckpt-bf16, which also "
            f"allocates the bf16 model and frees the fp32 one: {realloc[0]:.2f}x / {realloc[1]:.2f}x)",
            _verdict([conversion[0] <= 1.5], [conversion[1] <= 1.5]),
        ),
        (
            "private memory added <= 5% of the checkpoint (worst run)",
            ", ".join(f"{v}: {private[v]:.2f} %" for v in ours),
            "yes" if all(p <= 5 for p in private.values()) else "**no**",
        ),
    ]
    if concurrent:
        by = {c["variant"]: c for c in concurrent}
        ours_c = [v for v in ("ours-ckpt", "ours-safetensors") if v in by]
        cache_ok = all(by[v]["node_cache_peak_added_kib"] <= 1.05 * size_kib for v in ours_c)
        private_ok = all(by[v]["sum_private_peak_added_kib"] <= 0.05 * size_kib for v in ours_c)
        targets.append(
            (
                f"{args.ranks} ranks on one node use no more than one extra copy's worth of memory",
                "; ".join(
                    f"{v}: page cache +{by[v]['node_cache_peak_added_kib'] / size_kib:.2f} copies, "
                    f"private +{by[v]['sum_private_peak_added_kib'] / size_kib:.3f} copies"
                    for v in ours_c
                ),
                "yes" if cache_ok and private_ok else "**no**",
            )
        )
    lines += ["", "## Targets", "", "| target | measured (best / median) | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {ok} |" for t, m, ok in targets]
    if concurrent:
        lines += [
            "",
            f"## {args.ranks} processes on one node, loading the same file at once",
            "",
            "The file's pages are evicted from the page cache (`posix_fadvise(DONTNEED)`) after the "
            f"{args.ranks} processes have built their models and before they start loading, so page-cache "
            "growth is what the ranks together cost. Per-rank figures come from each rank's own sampler; "
            "node figures are peaks over the load sampled from /proc/meminfo every 5 ms by the parent, and "
            "count every process on this shared machine, so they corroborate rather than measure. The wall "
            "time includes reading the file from disk.",
            "",
            "| variant | wall time (all ranks) | sum of per-rank private peaks | node anonymous memory, peak growth | "
            "node page cache, peak growth | node memory in use, peak growth |",
            "|---|---|---|---|---|---|",
        ]
        for c in concurrent:
            lines.append(
                f"| {c['variant']} | {c['wall_s']:.2f} s | {fmt_mib(c['sum_private_peak_added_kib'])} MiB "
                f"({c['sum_private_peak_added_kib'] / size_kib:.2f} copies) | {fmt_mib(c['node_anon_peak_added_kib'])} MiB | "
                f"{fmt_mib(c['node_cache_peak_added_kib'])} MiB ({c['node_cache_peak_added_kib'] / size_kib:.2f} copies) | "
                f"{fmt_mib(c['node_used_peak_added_kib'])} MiB |"
            )
    lines += [
        "",
        "## How it is measured",
        "",
        "- Each run is a fresh process: it builds the model (every parameter allocated and written, as "
        "after an initialisation), imports everything, then times the load alone with `time.perf_counter`.",
        "- Private memory: a thread in the process reads `RssAnon` from `/proc/self/status` about every "
        "millisecond, from just before the load to just after it; the figure is the peak minus the value "
        "before. The model's parameters are allocated before and are not counted. Pages of a memory-mapped "
        "file are page cache, shared by every process on the node, and show as `RssFile`, not `RssAnon`.",
        "- The copy floor copies the same tensors, already loaded into private memory before the clock "
        "starts, into the parameters: one memory copy, the least any loader can do. The conversion floor "
        "(`floor-bf16`) does the same into bf16 parameters: one converting copy, the least a load that "
        "changes the dtype can do.",
        "- Every run checks that the parameters hold the file's values.",
        "- The machine is shared and noisy: compare the ratios of one run, not absolute times across runs.",
        "",
        "## Rerun",
        "",
        "```",
        "python scripts/bench_transfer.py                    # 1 GiB, writes docs/benchmarks/transfer.{md,png,json}",
        "python scripts/bench_transfer.py --size 256MiB --repeats 3 --out /tmp/bench",
        "```",
        "",
        f"![transfer benchmark]({out.name}.png)",
        "",
    ]
    return "\n".join(lines)


def _verdict(on_best: list[bool], on_median: list[bool]) -> str:
    if all(on_best) and all(on_median):
        return "yes"
    if all(on_best):
        return "yes on the best runs, **not** on the medians"
    return "**no**"


def plot(single: dict, concurrent: list, size: int, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(single)
    med = [statistics.median(r["wall_s"] for r in single[v]) for v in names]
    low = [min(r["wall_s"] for r in single[v]) for v in names]
    high = [max(r["wall_s"] for r in single[v]) for v in names]
    peak = [max(r["anon_peak_added_kib"] for r in single[v]) / 1024 for v in names]
    colors = [
        "#999999" if v.startswith("floor") else "#d62728" if v.startswith(("speechbrain", "naive")) else "#1f77b4"
        for v in names
    ]
    panels = 3 if concurrent else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.8))
    ax = axes[0]
    ax.bar(
        names, low, color=colors, yerr=[[0] * len(low), [hi - lo for lo, hi in zip(low, high, strict=False)]], capsize=3
    )
    ax.plot(names, med, "k_", markersize=14, label="median")
    ax.set_ylabel("wall time, s (bar: best run, whisker: worst)")
    ax.legend()
    ax.set_title(f"Loading {size / GiB:.2f} GiB, one process, warm cache")
    ax = axes[1]
    ax.bar(names, peak, color=colors)
    ax.axhline(0.05 * size / MiB, color="black", linestyle="--", linewidth=1, label="5 % of the checkpoint")
    ax.bar_label(ax.containers[0], labels=[f"{p:,.1f}" for p in peak], fontsize=8)
    ax.set_ylabel("private memory added, MiB (peak RssAnon)")
    ax.set_title("Private memory added by the load")
    ax.legend()
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
        for label in ax.get_xticklabels():
            label.set_ha("right")
    if concurrent:
        ax = axes[2]
        labels = [c["variant"] for c in concurrent]
        x = range(len(labels))
        priv = [c["sum_private_peak_added_kib"] / 1024 for c in concurrent]
        cache = [c["node_cache_peak_added_kib"] / 1024 for c in concurrent]
        ax.bar([i - 0.2 for i in x], priv, width=0.4, label="sum of private memory added", color="#d62728")
        ax.bar([i + 0.2 for i in x], cache, width=0.4, label="page cache growth (node)", color="#2ca02c")
        ax.axhline(size / MiB, color="black", linestyle="--", linewidth=1, label="one copy of the checkpoint")
        ax.set_xticks(list(x), labels, rotation=30, ha="right")
        ax.set_ylabel("MiB")
        ax.set_title(f"{concurrent[0]['ranks']} ranks on one node, cold cache")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=GiB, help="checkpoint size, e.g. 1GiB (default), 256MiB")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each one-process variant (default 5)")
    parser.add_argument("--ranks", type=int, default=4, help="processes in the one-node run (0 to skip; default 4)")
    parser.add_argument(
        "--workdir", type=pathlib.Path, default=None, help="where to write the checkpoints (a temp folder)"
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=REPO / "docs" / "benchmarks" / "transfer", help="output path without suffix"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return

    command = "python scripts/bench_transfer.py " + " ".join(sys.argv[1:])
    load_at_start = os.getloadavg()[0]
    args.blocks = blocks_for(args.size)
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="bench_transfer_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        print(f"writing a {args.blocks}-block checkpoint into {workdir} ...", flush=True)
        ckpt, st, expected = make_files(args.blocks, workdir)
        size = ckpt.stat().st_size
        spec = {"blocks": args.blocks, "ckpt": str(ckpt), "safetensors": str(st)}
        print(f"{size / GiB:.2f} GiB each; one process, {args.repeats} rounds:", flush=True)
        single = run_single(spec, [ckpt, st], args.repeats, expected)
        concurrent = []
        for variant in CONCURRENT if args.ranks > 0 else []:
            path = st if variant.endswith("safetensors") else ckpt
            result = run_concurrent(spec, variant, path, args.ranks)
            if any(abs(c - expected) > 1e-4 for c in result["checks"]):
                raise SystemExit(f"{variant}: a rank loaded wrong values")
            concurrent.append(result)
            print(
                f"  {args.ranks} ranks {variant:<18} {result['wall_s']:6.2f} s  private +{fmt_mib(result['sum_private_peak_added_kib'])} MiB"
                f"  page cache +{fmt_mib(result['node_cache_peak_added_kib'])} MiB",
                flush=True,
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    args.load = (load_at_start, os.getloadavg()[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = report(args, size, single, concurrent, args.out, command.strip())
    args.out.with_suffix(".md").write_text(text)
    plot(single, concurrent, size, args.out.with_suffix(".png"))
    raw = {
        "size": size,
        "blocks": args.blocks,
        "machine": machine(),
        "command": command.strip(),
        "single": single,
        "concurrent": concurrent,
    }
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(text)


if __name__ == "__main__":
    main()
