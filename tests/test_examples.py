"""The SLURM batch script and the Hub example, run as a user runs them.

This machine has no SLURM: the batch script is syntax-checked, its directives are read the way
sbatch reads them, and then the script itself runs under bash for one CPU node, with the variables
sbatch sets and `srun` replaced by a shim that starts one task per rank with SLURM_PROCID and
SLURM_LOCALID, so Lightning's SLURMEnvironment takes the ranks from them as on a cluster. The Hub example downloads
from the loopback Hub look-alike (HF_ENDPOINT, set by conftest.py).
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shlex
import subprocess
import sys

import pytest

# Every test here starts other processes (ranks, launchers): not in the fast loop.
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]

SBATCH = REPO / "examples" / "slurm" / "two_nodes.sbatch"
ASSET = REPO / "examples" / "assets" / "tiny-kws" / "pretrained.ckpt"
ASSET_SHA256 = "e9def5f3e2ca650dbc3285a8f89766c039ea705393228b3ce473ff75607fe5ea"


def sbatch_directives(text: str) -> dict[str, str]:
    """Returns the #SBATCH options as sbatch reads them: only before the first command of the script."""
    options = {}
    for line in text.splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if stripped.startswith("#SBATCH"):
            name, _, value = stripped.removeprefix("#SBATCH").split("#")[0].strip().partition("=")
            options[name] = value
    return options


def srun_command(text: str) -> list[str]:
    """Returns the words of the script's srun command line (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [line.strip() for line in joined.splitlines() if line.strip().startswith("srun ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def test_the_slurm_script_parses_and_asks_for_two_nodes_with_one_task_per_gpu():
    checked = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    text = SBATCH.read_text()
    options = sbatch_directives(text)
    assert options["--nodes"] == "2"
    assert options["--ntasks-per-node"] == options["--gpus-per-node"]  # Lightning expects srun to start every rank
    assert {"--job-name", "--time", "--output"} <= set(options)
    assert text.count("#SBATCH") == len(options)  # none after the first command, where sbatch would ignore it
    words = srun_command(text)
    script = next(word for word in words if word.endswith(".py"))
    assert (REPO / script).is_file()
    for flag, value in [
        ("--num-nodes", "$SLURM_NNODES"),
        ("--devices", "$SLURM_NTASKS_PER_NODE"),
        ("--accelerator", "$ACCELERATOR"),
    ]:
        assert words[words.index(flag) + 1] == value
    assert "pl-pretrain fetch" in text and "collect_per_node" in text  # the header explains both


SRUN = """#!/bin/sh
# srun for one node: start SLURM_NTASKS_PER_NODE tasks of the command here, each with its rank; wait for all.
echo "srun $*" >&2
pids=""
i=0
while [ "$i" -lt "$SLURM_NTASKS_PER_NODE" ]; do
    SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
    pids="$pids $!"
    i=$((i + 1))
done
status=0
for pid in $pids; do
    wait "$pid" || status=1
done
exit $status
"""


def test_the_slurm_script_runs_its_training_command_on_one_cpu_node_with_two_tasks(tmp_path):
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text(SRUN)
    (shims / "srun").chmod(0o755)
    run_dir = tmp_path / "run"
    job = {  # what sbatch sets for a one-node job with two tasks (srun adds each task's rank)
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_NAME": "pl-pretrain-finetune",
        "SLURM_JOB_ID": str(random.randint(10_000, 99_999)),
        "SLURM_NNODES": "1",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NTASKS": "2",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "127.0.0.1",
    }
    env = {
        **os.environ,
        **job,
        "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "ACCELERATOR": "cpu",
        "RUN_DIR": str(run_dir),
    }
    env.pop("MASTER_PORT", None)
    result = subprocess.run(
        ["bash", str(SBATCH), "--max-epochs", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"srun {sys.executable} examples/finetune.py --accelerator cpu --num-nodes 1 --devices 2 --out {run_dir} "
        "--max-epochs 1" in result.stderr
    )
    # Lightning took both ranks from SLURM's variables (it starts no process of its own under SLURM).
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in result.stderr and "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr
    summary = json.loads((run_dir / "result.json").read_text())
    assert summary["encoder"]["loaded"] == 4 and summary["encoder"]["sha256"] == ASSET_SHA256
    assert (run_dir / "pretrained" / "encoder.ckpt").is_symlink()


def test_the_hub_example_loads_the_encoder_from_a_repo_id_at_a_revision(tmp_path, hub):
    commit = hub.add_file("pl-pretrain/tiny-kws", "pretrained.ckpt", ASSET.read_bytes(), revision="v1")
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "hub_finetune.py"),
            "--revision",
            "v1",
            "--devices",
            "1",
            "--max-epochs",
            "1",
            "--out",
            str(out),
        ],
        env=dict(os.environ),  # HF_ENDPOINT (the loopback Hub) and this test's HF_HUB_CACHE
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert hub.count("GET", "/pl-pretrain/tiny-kws/resolve/v1/pretrained.ckpt") == 1
    summary = json.loads((out / "result.json").read_text())["encoder"]
    assert summary["location"] == f"hub:pl-pretrain/tiny-kws@{commit}/pretrained.ckpt"
    assert summary["revision"] == "v1" and summary["commit"] == commit and summary["sha256"] == ASSET_SHA256
    assert summary["loaded"] == 4
    assert pathlib.Path(os.path.realpath(out / "pretrained" / "encoder.ckpt")).is_relative_to(
        os.environ["HF_HUB_CACHE"]
    )


def test_sharded_example_fills_each_rank_shards(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, str(REPO / "examples" / "sharded_finetune.py"), "--out", str(out), "--max-epochs", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"result-rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["loaded"] == ["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"]
        assert rank["local_bytes"] * 2 == rank["bytes"]  # FSDP2 over 2 ranks: each copied half of every tensor
    assert "validation accuracy after fine-tuning" in result.stdout + result.stderr
