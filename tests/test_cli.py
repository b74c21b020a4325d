"""`pl-pretrain fetch | inspect | plan`, run as a user runs them: in a subprocess.

A user pre-fetches a job's files on a machine with network and then collects offline without a
single request; looks inside a checkpoint without loading it; and diagnoses a key mismatch with a
dry run that agrees with the real load. Every bad input ends in one line on stderr and a non-zero
exit. The dry run's library half (`plan_transfer`, `diagnose_transfer`) is tested in-process first.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import Encoder, ckpt_bytes, digest, module
from safetensors.torch import save_file

from pl_pretrain.errors import TransferError
from pl_pretrain.transfer import diagnose_transfer, plan_transfer, torch_parameter_transfer

# Most tests here run the CLI as a user does, in a subprocess: not in the fast loop.
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
ASSET = REPO / "examples" / "assets" / "tiny-kws" / "pretrained.ckpt"
ASSET_SHA256 = "sha256:e9def5f3e2ca650dbc3285a8f89766c039ea705393228b3ce473ff75607fe5ea"
CONSOLE_SCRIPT = pathlib.Path(sys.executable).parent / "pl-pretrain"


def cli(*args: str, cwd: pathlib.Path = REPO, env: dict[str, str] | None = None, script: bool = False):
    """Runs ``python -m pl_pretrain ARGS`` (or the ``pl-pretrain`` console script) and returns the result."""
    command = [str(CONSOLE_SCRIPT)] if script else [sys.executable, "-m", "pl_pretrain"]
    return subprocess.run(
        [*command, *args], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pl-pretrain: error: "), result.stderr
    return lines[0]


class Model(torch.nn.Module):
    """An encoder and a classifier head, as in fine-tuning."""

    def __init__(self, seed: int = 0, dim: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.encoder = Encoder(dim=dim, seed=seed)
        self.classifier = torch.nn.Linear(dim, classes)


@pytest.fixture
def whole_model_ckpt(tmp_path) -> pathlib.Path:
    """A checkpoint of a whole Model (keys encoder.* and classifier.*), as a training run saves it."""
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": Model(seed=1).state_dict(), "epoch": 3}, path)
    return path


# --------------------------------------------------------------------------------------------
# The dry run is the transfer's own logic
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, options",
    [
        (lambda: Model(seed=2), None),
        (lambda: Encoder(dim=8, seed=2), None),  # the prefix 'encoder.' is detected
        (lambda: Encoder(dim=8, seed=2), {"key_map": {"encoder.": ""}}),
        (lambda: Model(seed=2, classes=3), {"on_mismatch": "skip"}),
        (lambda: Model(seed=2, classes=3), {"exclude": ["classifier.*"], "dtype": "bfloat16"}),
        # nothing matches: missing + unexpected (accepted only when asked for)
        (lambda: Encoder(dim=8, seed=2), {"key_map": {"": ""}, "allow_empty": True}),
    ],
)
def test_a_plan_gives_the_report_of_the_real_transfer_and_copies_nothing(whole_model_ckpt, target, options):
    planned_into = target()
    before = copy.deepcopy(planned_into.state_dict())
    planned = plan_transfer(planned_into, whole_model_ckpt, options)
    after = planned_into.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert planned == torch_parameter_transfer(target(), whole_model_ckpt, options)


@pytest.mark.parametrize("options", [{}, {"strict": True, "on_mismatch": "skip"}])
def test_a_plan_raises_what_the_transfer_raises_and_diagnose_keeps_the_report(whole_model_ckpt, options):
    with pytest.raises(TransferError) as real:
        torch_parameter_transfer(Model(classes=3, dim=8), whole_model_ckpt, options)
    with pytest.raises(TransferError) as planned:
        plan_transfer(Model(classes=3, dim=8), whole_model_ckpt, options)
    assert str(planned.value) == str(real.value)
    report, error = diagnose_transfer(Model(classes=3, dim=8), whole_model_ckpt, options)
    assert str(error) == str(real.value)
    assert set(report.loaded) == {
        "encoder.proj.weight",
        "encoder.proj.bias",
        "encoder.norm.weight",
        "encoder.norm.bias",
    }
    assert report.mismatched == {"classifier.weight": ((4, 8), (3, 8)), "classifier.bias": ((4,), (3,))}


def test_a_model_built_on_the_meta_device_is_planned_for_its_shapes_only(whole_model_ckpt):
    with torch.device("meta"):
        target = Model(classes=3)
    report, error = diagnose_transfer(target, whole_model_ckpt, {"on_mismatch": "skip"}, shapes_only=True)
    assert error is None and len(report.loaded) == 4 and len(report.mismatched) == 2
    assert report.bytes == 4 * (64 + 8 + 8 + 8)
    _, error = diagnose_transfer(target, whole_model_ckpt, {"on_mismatch": "skip"})
    assert "meta device" in str(error)  # a real load into a meta model would fail: that check stays


# --------------------------------------------------------------------------------------------
# --help, and bad input: one line, a non-zero exit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["", "fetch", "inspect", "plan"])
def test_every_command_has_help_with_the_exit_codes(command):
    result = cli(*filter(None, [command]), "--help", script=command == "")  # the console script at least once
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: pl-pretrain {command}".rstrip())
    assert "exit codes:" in result.stdout and "the command line or a config file is wrong" in result.stdout
    assert result.stderr == ""


BAD_YAML = "trainer:\n  callbacks: [\n"
NO_CALLBACK_YAML = "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.EarlyStopping\n"


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["inspect", "no/such/file.ckpt"], 2, "Checkpoint 'no/such/file.ckpt' does not exist."),
        (["inspect", "{text}"], 1, "is not a checkpoint pl_pretrain can read"),
        (["fetch", "encoder"], 2, "argument KEY=SOURCE/FILE: 'encoder' is not of the form KEY=SOURCE/FILE"),
        (["fetch", "encoder=org/repo/e.ckpt", "--checksum", "decoder=sha256:00"], 2, "--checksum names 'decoder'"),
        (["fetch", "encoder=org/repo/e.ckpt", "--strategy", "HARDLINK"], 2, "invalid choice: 'HARDLINK'"),
        (["fetch", "--config", "{bad_yaml}"], 2, "is not valid YAML"),
        (["fetch", "--config", "{no_callback}"], 2, "has no PretrainerCallback in trainer.callbacks"),
        (["fetch"], 2, "Nothing to fetch"),
        (["fetch", "encoder={tmp}/missing.ckpt", "--collect-in", "{tmp}/c"], 1, "missing.ckpt' does not exist"),
        (["plan", str(ASSET), "--model", "no_such_module:Net"], 2, "Could not import 'no_such_module'"),
        (["plan", str(ASSET), "--model", "helpers:Encoder", "--init-args", "dim=8"], 2, "is not JSON"),
        (["plan", str(ASSET), "--model", "helpers:Encoder", "--attribute", "decoder"], 2, "No submodule 'decoder'"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_a_non_zero_exit(tmp_path, args, code, message):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    (tmp_path / "none.yaml").write_text(NO_CALLBACK_YAML)
    fill = {
        "text": tmp_path / "notes.txt",
        "bad_yaml": tmp_path / "bad.yaml",
        "no_callback": tmp_path / "none.yaml",
        "tmp": tmp_path,
    }
    result = cli(*(arg.format(**fill) for arg in args))
    assert result.returncode == code, result.stderr
    assert message in one_error_line(result)
    assert "Traceback" not in result.stderr and result.stdout == ""


# --------------------------------------------------------------------------------------------
# fetch: collect ahead, then run offline
# --------------------------------------------------------------------------------------------

OFFLINE_JOB = """
import json, sys
from helpers import digest, module
from pl_pretrain import FetchConfig, Pretrainer
collect_in, node_folder, encoder_src, decoder_src, lm_src = sys.argv[1:]
models = {"encoder": module(0), "decoder": module(0), "lm": module(0)}
# The job's own settings (revision v1) with the network off: the files collected by `fetch` are reused.
pt = Pretrainer(collect_in, {k: models[k] for k in ("encoder", "decoder")}, {"encoder": encoder_src, "decoder": decoder_src})
pt.collect_files(fetch_config=FetchConfig(allow_network=False, revision="v1"))
pt.load_collected()
lm = Pretrainer(node_folder, {"lm": models["lm"]}, {"lm": lm_src})  # placed from the Hub cache into a new folder
lm.collect_files(fetch_config=FetchConfig(allow_network=False))
lm.load_collected()
print(json.dumps({k: digest(m) for k, m in models.items()}))
"""


def test_fetch_then_a_fresh_offline_process_collects_without_a_single_request(tmp_path, hub, http_server):
    commit = hub.add_file("org/asr", "encoder.ckpt", ckpt_bytes(module(1)), revision="v1")
    hub.add_file("org/lm", "lm.ckpt", ckpt_bytes(module(3)))
    url = http_server.add("models/decoder.ckpt", ckpt_bytes(module(2)))
    collect_in = tmp_path / "pretrained"

    fetched = cli(
        "fetch",
        "encoder=org/asr/encoder.ckpt",
        f"decoder={url}",
        "--collect-in",
        str(collect_in),
        "--revision",
        "v1",
        "--json",
    )
    assert fetched.returncode == 0, fetched.stderr
    rows = {row["key"]: row for row in json.loads(fetched.stdout)}
    assert rows["encoder"]["from"] == f"hub:org/asr@{commit}/encoder.ckpt" and rows["encoder"]["commit"] == commit
    assert rows["encoder"]["placed"] == str(collect_in / "encoder.ckpt") and rows["encoder"]["status"] == "fetched"
    assert rows["decoder"]["from"] == url and rows["decoder"]["size"] == len(ckpt_bytes(module(2)))
    assert all(row["sha256"].startswith("sha256:") and len(row["sha256"]) == 71 for row in rows.values())
    assert hub.count(path_part="/resolve/v1/") >= 1

    cache_only = cli("fetch", "lm=org/lm/lm.ckpt", "--collect-in", "none")  # the Hub cache only, as a table
    assert cache_only.returncode == 0, cache_only.stderr
    assert "lm   fetched" in cache_only.stdout and "into the caches (--collect-in none)" in cache_only.stdout
    assert not (REPO / "model_checkpoints").exists()

    hub.reset_log()
    http_server.reset_log()
    job = subprocess.run(
        [
            sys.executable,
            "-c",
            OFFLINE_JOB,
            str(collect_in),
            str(tmp_path / "node"),
            "org/asr/encoder.ckpt",
            url,
            "org/lm/lm.ckpt",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert job.returncode == 0, job.stderr
    assert json.loads(job.stdout) == {
        "encoder": digest(module(1)),
        "decoder": digest(module(2)),
        "lm": digest(module(3)),
    }
    assert hub.arrivals() == 0 and http_server.arrivals() == 0  # not one request reached a server


def test_fetch_from_a_lightning_cli_config_uses_its_callbacks_not_its_offline_switch(tmp_path, hub, http_server):
    commit = hub.add_file("org/asr", "encoder.ckpt", ckpt_bytes(module(1)), revision="v2")
    http_server.add("shared/decoder.ckpt", ckpt_bytes(module(2)))
    config = tmp_path / "job.yaml"
    config.write_text(
        textwrap.dedent(f"""\
        trainer:
          callbacks:
            - class_path: lightning.pytorch.callbacks.EarlyStopping
              init_args: {{monitor: val_loss}}
            - class_path: pl_pretrain.PretrainerCallback
              init_args:
                collect_in: {tmp_path / "pretrained"}
                loadables: {{encoder: encoder, decoder: model.decoder, head: head}}
                paths: {{encoder: org/asr/encoder.ckpt, head: {ASSET}}}
                default_source: {http_server.url}/shared
                checksums: {{head: "{ASSET_SHA256}"}}
                local_strategy: COPY
                fetch_config: {{allow_network: false, revision: v2}}
        model: {{num_classes: 4}}
        """)
    )
    result = cli("fetch", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["key"]: row for row in json.loads(result.stdout)}
    assert sorted(rows) == ["decoder", "encoder", "head"]
    assert rows["encoder"]["commit"] == commit and hub.count(path_part="/resolve/v2/encoder.ckpt") >= 1
    assert rows["head"]["sha256"] == ASSET_SHA256
    for key in rows:
        placed = tmp_path / "pretrained" / f"{key}.ckpt"
        assert placed.is_file() and not placed.is_symlink()  # local_strategy: COPY, from the YAML


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def test_inspect_a_lightning_checkpoint_with_the_console_script():
    result = cli("inspect", "examples/assets/tiny-kws/pretrained.ckpt", script=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "format      lightning (Lightning " in out
    assert "tensors     6\n" in out and "parameters  5,898 (23.0 KiB)" in out and "dtypes      float32 (6)" in out
    assert "not loaded  epoch: 15, global_step: 1875" in out and "hyper_parameters: {num_classes=10, lr=0.05}" in out
    assert "encoder.layers.0.weight  [64, 16]  float32" in out and "head.bias                [10]      float32" in out
    assert "sha256" not in out  # only with --sha256


def test_inspect_a_sharded_checkpoint_as_json_with_filter_and_limit(tmp_path):
    state = {f"layers.{i}.weight": torch.zeros(4, 4, dtype=torch.bfloat16) for i in range(4)}
    state["embed.weight"] = torch.zeros(10, 4)
    save_file({k: v for k, v in state.items() if k < "layers.2"}, str(tmp_path / "model-1-of-2.safetensors"))
    save_file({k: v for k, v in state.items() if k >= "layers.2"}, str(tmp_path / "model-2-of-2.safetensors"))
    weight_map = {k: "model-1-of-2.safetensors" if k < "layers.2" else "model-2-of-2.safetensors" for k in state}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    result = cli("inspect", str(index), "--filter", "layers.*", "--limit", "3", "--sha256", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "sharded-safetensors" and info["shards"] == [
        "model-1-of-2.safetensors",
        "model-2-of-2.safetensors",
    ]
    assert info["tensors"] == 5 and info["parameters"] == 4 * 16 + 40 and info["tensor_bytes"] == 4 * 32 + 160
    assert info["dtypes"] == {"bfloat16": 4, "float32": 1}
    assert info["matching"] == 4 and info["shown"] == 3
    assert [k["key"] for k in info["keys"]] == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    assert info["keys"][0] == {"key": "layers.0.weight", "shape": [4, 4], "dtype": "bfloat16"}
    assert info["sha256"].startswith("sha256:")


def test_inspect_and_plan_a_sharded_checkpoint_collected_by_copy(tmp_path, capsys):
    # The Pretrainer collects an index as <key>.ckpt and its shards into <key>.shards/: the CLI,
    # pointed at the collected file, must find them there (the readers no longer guess that folder).
    from pl_pretrain import LocalStrategy, Pretrainer
    from pl_pretrain.cli import main

    source = tmp_path / "source"
    source.mkdir()
    enc = Encoder()
    state = enc.state_dict()
    names = sorted(state)
    half = len(names) // 2
    save_file({k: state[k].contiguous() for k in names[:half]}, str(source / "m-1.safetensors"))
    save_file({k: state[k].contiguous() for k in names[half:]}, str(source / "m-2.safetensors"))
    weight_map = {k: "m-1.safetensors" if i < half else "m-2.safetensors" for i, k in enumerate(names)}
    (source / "m.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    collect_in = tmp_path / "collected"
    pt = Pretrainer(collect_in, {"enc": Encoder()}, paths={"enc": str(source / "m.safetensors.index.json")})
    pt.collect_files(local_strategy=LocalStrategy.COPY)
    collected = collect_in / "enc.ckpt"
    assert (collect_in / "enc.shards" / "m-1.safetensors").is_file()

    assert main(["inspect", str(collected), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "sharded-safetensors" and info["tensors"] == len(names)
    assert main(["plan", str(collected), "--model", "helpers:Encoder"]) == 0, capsys.readouterr().err


def test_inspect_a_legacy_lightning_checkpoint_which_cannot_be_mapped(tmp_path, capsys):
    from pl_pretrain.cli import main

    path = tmp_path / "legacy.ckpt"
    torch.save(
        {"state_dict": Model().state_dict(), "pytorch-lightning_version": "1.9.0", "epoch": 2},
        path,
        _use_new_zipfile_serialization=False,
    )
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "lightning" and info["tensors"] == 6 and info["other_entries"] == {}


MEASURE = """
import contextlib, io, json, resource, sys
import pl_pretrain.cli as cli
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = cli.main(["inspect", sys.argv[1], "--json"])
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"code": code, "grew_kib": grew, "info": json.loads(out.getvalue()),
                  "lightning": sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning"))}))
"""


def test_inspect_reads_a_big_checkpoint_through_a_memory_map_without_importing_lightning(tmp_path):
    path = tmp_path / "big.ckpt"
    torch.save({"state_dict": {"weight": torch.ones(24 * 1024 * 1024)}, "epoch": 1}, path)  # 96 MiB of float32
    result = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["code"] == 0 and measured["info"]["tensor_bytes"] == 96 * 1024 * 1024
    # The peak resident memory grows by the pickle, not the 96 MiB of tensors (mapped, never touched).
    assert measured["grew_kib"] < 16 * 1024, measured["grew_kib"]
    assert measured["lightning"] == []


# --------------------------------------------------------------------------------------------
# plan: diagnose a key mismatch
# --------------------------------------------------------------------------------------------


def test_plan_finds_the_encoder_in_a_whole_model_checkpoint(whole_model_ckpt):
    result = cli("plan", str(whole_model_ckpt), "--model", "helpers:Encoder", "--init-args", '{"dim": 8}')
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "model       helpers:Encoder(dim=8), built on the meta device" in out
    assert (
        "loadable  format  loaded  missing  unexpected  mismatched  excluded   size  source\n" in out
    )  # format_reports'
    assert "prefix 'encoder.': found in front of every model key in the file, and stripped" in out
    assert "would load: 4\n  proj.weight  [8, 8]\n" in out
    assert "excluded (left out on purpose): 2\n  classifier.weight\n  classifier.bias\n" in out
    assert out.rstrip().endswith(
        "verdict: OK: a real load would copy 4 tensors (352 B) and leave nothing missing, unexpected or mismatched."
    )


def test_plan_shows_a_shape_mismatch_as_the_failure_a_real_load_would_be(whole_model_ckpt):
    result = cli("plan", str(whole_model_ckpt), "--model", "test_cli:Model", "--init-args", '{"classes": 3}', "--json")
    assert result.returncode == 1, result.stderr
    plan = json.loads(result.stdout)
    assert plan["would_succeed"] is False and plan["built_on"] == "meta"
    assert plan["report"]["mismatched"] == {"classifier.weight": [[4, 8], [3, 8]], "classifier.bias": [[4], [3]]}
    assert "has other shapes than Model for 2 keys" in plan["error"] and plan["verdict"].startswith("FAIL: ")
    assert result.stderr == ""  # the diagnosis is the output, not an error


def test_plan_suggests_the_key_map_and_the_options_override_the_defaults(whole_model_ckpt):
    result = cli("plan", str(whole_model_ckpt), "--model", "helpers:Encoder", "--key-map", "=", "--key", "encoder")
    assert result.returncode == 1, result.stderr
    assert "missing (the model keeps its values): 4" in result.stdout
    assert "unexpected (in the file, not read): 6" in result.stdout
    assert (
        "hint: the missing keys are in the file under the prefix 'encoder.'; try --key-map 'encoder.='" in result.stdout
    )
    # Loading nothing is what a real load refuses, with the same key map proposed.
    assert "verdict: FAIL: a real load would raise TransferError and copy nothing" in result.stdout
    assert "would load no tensor at all" in result.stdout and "key_map={'encoder.': ''}" in result.stdout
    strict = cli("plan", str(whole_model_ckpt), "--model", "helpers:Encoder", "--key-map", "=", "--strict", "--json")
    assert strict.returncode == 1 and "Strict transfer" in json.loads(strict.stdout)["error"]


def test_plan_from_the_lightning_cli_example_config():
    result = cli(
        "plan",
        str(ASSET),
        "--config",
        "examples/cli/config.yaml",
        "--model",
        "examples/tiny_model.py:KeywordClassifier",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert (
        "model       examples/tiny_model.py:KeywordClassifier(num_classes=4, lr=0.05), built on the meta device" in out
    )
    assert "loads into  encoder (Encoder): 4 tensors" in out
    assert "options     key_map={'encoder.': ''}" in out  # the callback's transfer_options for 'encoder'
    assert "verdict: OK: a real load would copy 4 tensors (20.5 KiB)" in out
