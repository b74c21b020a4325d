"""Parameter transfer: every format, key mapping, shape policy and strictness, safe loading, the report.

Each test builds a small model, writes a checkpoint the way its ecosystem does (torch.save,
safetensors, a real Lightning Trainer, huggingface_hub's sharded writer), loads it into a fresh
model and checks the weights and the report. Timing lives in scripts/bench_transfer.py, not here.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import zipfile

import pytest
import torch
from helpers import Encoder, same
from safetensors.torch import save_file

from pl_pretrain import LocalStrategy, Pretrainer, TransferOptions, TransferReport, torch_parameter_transfer
from pl_pretrain.errors import ConfigurationError, TransferError, UnsafeCheckpointError
from pl_pretrain.transfer import format_reports, read_state_dict


class Model(torch.nn.Module):
    """An encoder and a classifier head, as in fine-tuning."""

    def __init__(self, seed: int, classes: int = 4) -> None:
        super().__init__()
        self.encoder = Encoder(dim=8, seed=seed)
        self.classifier = torch.nn.Linear(8, classes)


def write(path: pathlib.Path, state: dict, how: str = "zip") -> pathlib.Path:
    """Returns `path` after saving `state` there as a torch zip, a legacy torch pickle or safetensors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=(how == "zip"))
    return path


def copy_of(mod: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in mod.state_dict().items()}


def load(tmp_path: pathlib.Path, target: torch.nn.Module, path: pathlib.Path, options=None, key: str = "encoder"):
    """Returns load_collected()'s report for `key`, loading `path` into `target` through a Pretrainer."""
    pt = Pretrainer(
        tmp_path / "collected",
        {key: target},
        {key: str(path)},
        transfer_options={key: options} if options is not None else None,
    )
    pt.collect_files()
    return pt.load_collected()[key]


def mapped_file_of(tensor: torch.Tensor) -> str | None:
    """Returns the file whose memory mapping holds `tensor`'s data, or None for private memory."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) == 6 and fields[5].startswith("/") else None
    return None


# --------------------------------------------------------------------------------------------
# Formats, found from the content
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "how, name, fmt",
    [
        ("zip", "encoder.ckpt", "torch"),
        ("zip", "pytorch_model.bin", "torch"),
        ("zip", "model.pth", "torch"),
        ("legacy", "encoder.pt", "torch-legacy"),
        ("safetensors", "model.safetensors", "safetensors"),
        ("safetensors", "encoder.ckpt", "safetensors"),  # what the Pretrainer collects it as
    ],
)
def test_every_format_loads_whatever_the_file_is_called(tmp_path, how, name, fmt):
    source, target = Encoder(seed=1), Encoder(seed=2)
    path = write(tmp_path / "src" / name, source.state_dict(), how)
    report = load(tmp_path, target, path)
    assert same(source, target)
    assert report.format == fmt
    assert report.complete
    assert sorted(report.loaded) == sorted(source.state_dict())
    assert report.bytes == sum(t.numel() * t.element_size() for t in source.state_dict().values())


def test_tensors_are_read_through_a_memory_map_and_copied_in_place(tmp_path):
    for how in ("zip", "safetensors"):
        path = write(tmp_path / f"{how}.ckpt", Encoder(seed=1).state_dict(), how)
        state, _ = read_state_dict(path)
        assert {mapped_file_of(t) for t in state.values()} == {os.path.realpath(path)}, how
        state, _ = read_state_dict(path, TransferOptions(mmap=False))
        assert {mapped_file_of(t) for t in state.values()} == {None}, how
    target = Encoder(seed=2)
    params = {name: (p, p.data_ptr()) for name, p in target.named_parameters()}
    torch_parameter_transfer(target, path)
    assert {name: (p, p.data_ptr()) for name, p in target.named_parameters()} == params


def test_a_lightning_checkpoint_loads_the_attribute_into_its_module(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")

    class Classifier(lightning.LightningModule):
        def __init__(self, classes: int = 3) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.encoder = Encoder(seed=5)
            self.head = torch.nn.Linear(8, classes)

        def training_step(self, batch, batch_idx):
            return self.head(self.encoder.norm(self.encoder.proj(batch))).sum()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())

    trained = Classifier()
    trainer = lightning.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(trained, torch.utils.data.DataLoader(torch.randn(4, 8), batch_size=4))
    trainer.save_checkpoint(tmp_path / "src" / "epoch=0-step=1.ckpt")

    encoder = Encoder(seed=6)
    report = load(tmp_path, encoder, tmp_path / "src" / "epoch=0-step=1.ckpt")
    assert same(trained.encoder, encoder)
    assert report.format == "lightning"
    assert report.prefix == "encoder."
    assert report.complete
    assert sorted(report.excluded) == ["head.bias", "head.weight"]
    assert "prefix 'encoder.'" in format_reports({"encoder": report})

    # The same file into the whole model, and into the head alone by an explicit prefix.
    whole = Classifier()
    assert load(tmp_path / "whole", whole, tmp_path / "src" / "epoch=0-step=1.ckpt", key="model").prefix == ""
    assert same(trained, whole)
    head = torch.nn.Linear(8, 3)
    report = load(tmp_path / "head", head, tmp_path / "src" / "epoch=0-step=1.ckpt", {"key_map": {"head.": ""}}, "head")
    assert torch.equal(head.weight, trained.head.weight) and report.complete


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model."])
def test_a_wrapper_prefix_is_detected_and_reported(tmp_path, prefix):
    # DDP saves under "module.", torch.compile under "_orig_mod.", a training dict as {"model": ...}.
    source, target = Encoder(seed=1), Encoder(seed=2)
    state = (
        {"model": source.state_dict(), "step": 7}
        if prefix == "model."
        else {prefix + k: v for k, v in source.state_dict().items()}
    )
    report = torch_parameter_transfer(target, write(tmp_path / "x.ckpt", state))
    assert same(source, target)
    assert report.prefix == prefix and report.complete


def test_an_ambiguous_prefix_is_an_error_that_says_how_to_choose(tmp_path):
    state = {f"{side}.{k}": v for side in ("student", "teacher") for k, v in Encoder(seed=1).state_dict().items()}
    target = Encoder(seed=2)
    before = copy_of(target)
    with pytest.raises(TransferError, match=r"several prefixes \('student.', 'teacher.'\).*key_map=\{'student.': ''\}"):
        torch_parameter_transfer(target, write(tmp_path / "x.ckpt", state))
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


@pytest.mark.parametrize("how", ["safetensors", "zip"])
def test_a_sharded_checkpoint_in_a_local_folder(tmp_path, how):
    import huggingface_hub

    source, target = Model(seed=1), Model(seed=2)
    (tmp_path / "src").mkdir()
    huggingface_hub.save_torch_state_dict(
        source.state_dict(), tmp_path / "src", max_shard_size=400, safe_serialization=(how == "safetensors")
    )
    index = next((tmp_path / "src").glob("*.index.json"))
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    report = load(tmp_path, target, index, key="model")
    assert same(source, target)
    assert report.format == ("sharded-safetensors" if how == "safetensors" else "sharded-torch")
    assert report.complete and report.source == tmp_path / "collected" / "model.ckpt"
    collected = (tmp_path / "collected" / "model.shards").iterdir()
    assert sorted(p.name for p in collected if not p.name.startswith(".")) == sorted(
        set(json.loads(index.read_text())["weight_map"].values())
    )

    # Read where it lives (no collection), and through a bare link to the index: shards beside it.
    other = Model(seed=3)
    assert torch_parameter_transfer(other, index).complete and same(source, other)
    (tmp_path / "link.ckpt").symlink_to(index)
    other = Model(seed=4)
    assert torch_parameter_transfer(other, tmp_path / "link.ckpt").complete and same(source, other)


@pytest.mark.parametrize("strategy", list(LocalStrategy))
def test_a_sharded_checkpoint_from_the_hub(tmp_path, hub, strategy):
    import huggingface_hub

    source, target = Model(seed=1), Model(seed=2)
    (tmp_path / "src").mkdir()
    huggingface_hub.save_torch_state_dict(source.state_dict(), tmp_path / "src", max_shard_size=400)
    for file in (tmp_path / "src").iterdir():
        hub.add_file("org/sharded", file.name, file.read_bytes())
    pt = Pretrainer(tmp_path / "c", {"model": target}, {"model": "org/sharded/model.safetensors.index.json"})
    pt.collect_files(local_strategy=strategy)
    report = pt.load_collected()["model"]
    assert same(source, target)
    assert report.format == "sharded-safetensors" and report.complete


def test_a_missing_shard_names_the_shard_and_where_it_was_looked_for(tmp_path):
    import huggingface_hub

    (tmp_path / "src").mkdir()
    huggingface_hub.save_torch_state_dict(Model(seed=1).state_dict(), tmp_path / "src", max_shard_size=400)
    shard = next((tmp_path / "src").glob("*-00002-*"))
    shard.unlink()
    with pytest.raises(TransferError, match=rf"Shard '{shard.name}' of the sharded checkpoint .* is in none of"):
        torch_parameter_transfer(Model(seed=2), tmp_path / "src" / "model.safetensors.index.json")


def test_shards_are_read_from_the_folder_the_caller_names(tmp_path):
    import huggingface_hub

    from pl_pretrain.transfer import diagnose_transfer, plan_transfer

    # An index copied on its own (as a COPY collection does), its shards in a folder of their own.
    source = Model(seed=1)
    (tmp_path / "src").mkdir()
    huggingface_hub.save_torch_state_dict(source.state_dict(), tmp_path / "src", max_shard_size=400)
    (tmp_path / "kept").mkdir()
    index = tmp_path / "kept" / "model.ckpt"
    index.write_bytes((tmp_path / "src" / "model.safetensors.index.json").read_bytes())
    shards = tmp_path / "kept" / "model.shards"
    (tmp_path / "src").rename(shards)

    # The readers do not guess the Pretrainer's <key>.shards/ layout: the folder is passed in.
    with pytest.raises(TransferError, match=r"Shard '.*' of the sharded checkpoint .* is in none of"):
        torch_parameter_transfer(Model(seed=2), index)
    assert plan_transfer(Model(seed=2), index, shard_dir=shards).complete
    assert diagnose_transfer(Model(seed=2), index, shard_dir=shards)[1] is None
    assert len(read_state_dict(index, shard_dir=shards)[0]) == len(source.state_dict())
    target = Model(seed=2)
    report = torch_parameter_transfer(target, index, shard_dir=shards)
    assert report.complete and report.format == "sharded-safetensors" and same(source, target)


def test_an_index_that_does_not_match_its_shards_is_an_error(tmp_path):
    write(tmp_path / "a.safetensors", {"w": torch.ones(2)}, "safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "a.safetensors", "b": "a.safetensors"}}))
    with pytest.raises(TransferError, match="places b in .* which does not hold it"):
        read_state_dict(index)


def test_a_tensor_that_a_shard_holds_but_the_index_places_elsewhere_is_an_error(tmp_path):
    # Two shards both hold "w"; the index says it lives in a. Reading b last used to override it.
    write(tmp_path / "a.safetensors", {"w": torch.ones(2)}, "safetensors")
    write(tmp_path / "b.safetensors", {"w": torch.zeros(2), "v": torch.ones(1)}, "safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "a.safetensors", "v": "b.safetensors"}}))
    with pytest.raises(TransferError, match=r"holds w, which the index places in 'a.safetensors'"):
        read_state_dict(index)


def _replace_shard(shard: pathlib.Path, seed: int) -> None:
    """Rewrites a safetensors shard with other values under the same names and shapes."""
    from safetensors.torch import load_file

    torch.manual_seed(seed)
    write(shard, {k: torch.randn_like(v) for k, v in load_file(str(shard)).items()}, "safetensors")


def test_a_pinned_index_pins_its_shards_between_runs_and_before_loading(tmp_path):
    import hashlib

    import huggingface_hub

    from pl_pretrain.errors import ChecksumError

    source = Model(seed=1)
    (tmp_path / "src").mkdir()
    huggingface_hub.save_torch_state_dict(source.state_dict(), tmp_path / "src", max_shard_size=400)
    index = tmp_path / "src" / "model.safetensors.index.json"
    pin = {"model": "sha256:" + hashlib.sha256(index.read_bytes()).hexdigest()}

    def collect(strategy: LocalStrategy) -> Pretrainer:
        pt = Pretrainer(tmp_path / "c", {"model": Model(seed=2)}, {"model": str(index)}, checksums=pin)
        pt.collect_files(local_strategy=strategy)
        return pt

    pt = collect(LocalStrategy.COPY)
    assert pt.load_collected()["model"].complete and same(source, pt.loadables["model"])

    # A collected shard rewritten before the load: the index still matches its pin, the weights do not.
    copied = next((tmp_path / "c" / "model.shards").glob("*-00002-*"))
    _replace_shard(copied, seed=5)
    target = pt.loadables["model"] = Model(seed=3)
    before = copy_of(target)
    with pytest.raises(ChecksumError, match=rf"Shard '.*{copied.name}' changed after it was collected") as raised:
        pt.load_collected()
    assert raised.value.key == "model"
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())

    # The source's shard replaced under the same index: the next collection refuses it.
    (tmp_path / "c").rename(tmp_path / "old")
    collect(LocalStrategy.SYMLINK).load_collected()  # records the shards of this index
    _replace_shard(next((tmp_path / "src").glob("*-00002-*")), seed=6)
    with pytest.raises(ChecksumError, match=r"Shard '.*-00002-.*' of the pinned index is not the one recorded"):
        collect(LocalStrategy.SYMLINK)


# --------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------


def test_include_loads_only_the_matching_keys(tmp_path):
    source, target = Model(seed=1), Model(seed=2)
    before = copy_of(target)
    report = torch_parameter_transfer(
        target, write(tmp_path / "m.ckpt", source.state_dict()), TransferOptions(include="encoder.*")
    )
    assert same(source.encoder, target.encoder)
    assert torch.equal(target.classifier.weight, before["classifier.weight"])
    assert report.complete and sorted(report.excluded) == ["classifier.bias", "classifier.weight"]


def test_exclude_keeps_a_new_classifier_head_quietly(tmp_path, caplog):
    source, target = Model(seed=1, classes=10), Model(seed=2, classes=3)
    before = copy_of(target)
    with caplog.at_level(logging.WARNING):
        report = load(
            tmp_path, target, write(tmp_path / "src" / "m.ckpt", source.state_dict()), {"exclude": ["classifier.*"]}
        )
    assert same(source.encoder, target.encoder)
    assert torch.equal(target.classifier.weight, before["classifier.weight"])
    assert report.complete and not report.mismatched and not caplog.records


def test_a_prefix_map_loads_a_submodule_of_the_file_espnet_style(tmp_path):
    source, target = Model(seed=1), Encoder(seed=2)
    path = write(tmp_path / "m.ckpt", {"model." + k: v for k, v in source.state_dict().items()})
    report = torch_parameter_transfer(target, path, TransferOptions(key_map={"model.encoder.": ""}))
    assert same(source.encoder, target)
    assert report.complete and report.prefix == ""
    assert sorted(report.excluded) == ["model.classifier.bias", "model.classifier.weight"]

    # And the other way round: a bare encoder's file into the encoder of a whole model.
    whole = Model(seed=3)
    report = torch_parameter_transfer(
        whole, write(tmp_path / "e.ckpt", source.encoder.state_dict()), {"key_map": {"": "encoder."}}
    )
    assert same(source.encoder, whole.encoder)
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight"]


def test_the_longest_prefix_wins_and_an_empty_prefix_keeps_the_rest(tmp_path):
    source, target = Model(seed=1), Model(seed=2)
    state = {k.replace("encoder.", "enc."): v for k, v in source.state_dict().items()}
    report = torch_parameter_transfer(
        target, write(tmp_path / "m.ckpt", state), {"key_map": {"enc.": "encoder.", "": ""}}
    )
    assert same(source, target) and report.complete


def test_a_callable_maps_and_drops_keys(tmp_path):
    source, target = Encoder(seed=1), Encoder(seed=2)
    state = {k.replace("proj", "linear"): v for k, v in source.state_dict().items()}
    state["optimizer_step"] = torch.tensor(3)

    def rename(key: str) -> str | None:
        return None if key == "optimizer_step" else key.replace("linear", "proj")

    report = torch_parameter_transfer(target, write(tmp_path / "m.ckpt", state), TransferOptions(key_map=rename))
    assert same(source, target)
    assert report.complete and report.excluded == ["optimizer_step"]


def test_two_file_keys_sent_to_one_target_key_is_an_error(tmp_path):
    path = write(tmp_path / "m.ckpt", {"a.weight": torch.ones(2), "b.weight": torch.ones(2)})
    with pytest.raises(ConfigurationError, match="sends both 'a.weight' and 'b.weight' .* to the target key 'weight'"):
        torch_parameter_transfer(torch.nn.LayerNorm(2), path, {"key_map": lambda k: k.split(".", 1)[1]})


def test_an_explicit_identity_map_turns_prefix_detection_off(tmp_path):
    source = Encoder(seed=1)
    path = write(tmp_path / "m.ckpt", {"module." + k: v for k, v in source.state_dict().items()})
    report = torch_parameter_transfer(Encoder(seed=2), path, {"key_map": {"": ""}, "allow_empty": True})
    assert not report.loaded and len(report.missing) == 4 and len(report.unexpected) == 4


class Classifier(torch.nn.Module):
    """A pretrained body under ``bert`` and a new head, as BertForSequenceClassification is laid out."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.bert = Encoder(dim=8, seed=seed)
        self.classifier = torch.nn.Linear(8, 3)


class EncoderWithPooler(torch.nn.Module):
    """A body with a pooler, as BertModel is; classifiers' checkpoints often drop the pooler."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.encoder = Encoder(dim=8, seed=seed)
        self.pooler = torch.nn.Linear(8, 8)


@pytest.mark.parametrize(
    "case, options, why",
    [
        ("include", {"include": ["encoders.*"]}, r"include='encoders\.\*'\) matches no key"),
        ("exclude everything", {"exclude": ["*"], "strict": True}, "would load no tensor at all"),
        ("bare body file", {}, r"would load no tensor at all.*key_map=\{'': 'bert\.'\}"),
    ],
)
def test_a_load_that_would_load_nothing_is_an_error_unless_asked_for(tmp_path, case, options, why):
    # A bare body file (BertModel's keys) into a classifier: not one key matches as it is.
    source = Encoder(seed=1) if case == "bare body file" else Classifier(seed=1)
    path = write(tmp_path / "src" / "body.ckpt", source.state_dict())
    target = Classifier(seed=2)
    before = copy_of(target)
    with pytest.raises(TransferError, match=why) as raised:
        load(tmp_path, target, path, options, key="model")
    assert raised.value.key == "model"
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    # Loading nothing on purpose is accepted, and says so in the report.
    report = load(tmp_path, Classifier(seed=2), path, {**options, "allow_empty": True}, key="model")
    assert report.loaded == [] and report.bytes == 0


def test_the_suggested_key_map_loads_the_bare_body_file(tmp_path):
    source, target = Encoder(seed=1), Classifier(seed=2)
    path = write(tmp_path / "body.ckpt", source.state_dict())
    with pytest.raises(TransferError) as raised:
        torch_parameter_transfer(target, path)
    assert "key_map={'': 'bert.'}" in str(raised.value)
    report = torch_parameter_transfer(target, path, {"key_map": {"": "bert."}})
    assert same(source, target.bert) and sorted(report.missing) == ["classifier.bias", "classifier.weight"]


def test_prefix_detection_tolerates_a_target_key_the_file_lacks(tmp_path):
    # A classifier's checkpoint (keys under "bert.", no pooler) into the body alone (which has one).
    source = Classifier(seed=1)
    path = write(tmp_path / "clf.ckpt", {"bert.encoder." + k: v for k, v in source.bert.state_dict().items()})
    target = EncoderWithPooler(seed=2)
    pooler = copy_of(target.pooler)
    report = torch_parameter_transfer(target, path)
    assert report.prefix == "bert."
    assert same(source.bert, target.encoder)
    assert sorted(report.missing) == ["pooler.bias", "pooler.weight"]
    assert torch.equal(target.pooler.weight, pooler["weight"])


def test_a_pattern_that_matches_nothing_warns_once_and_fails_under_strict(tmp_path, caplog):
    source, target = Model(seed=1), Model(seed=2)
    path = write(tmp_path / "src" / "m.ckpt", source.state_dict())
    with caplog.at_level(logging.WARNING, logger="pl_pretrain"):
        report = load(tmp_path, target, path, {"exclude": ["clasifier.*"]}, key="model")  # a typo: nothing left out
    assert same(source, target) and report.complete
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "model: warning: TransferOptions(exclude='clasifier.*') matches no key" in warnings[0]
    with pytest.raises(TransferError, match=r"Strict transfer .*\(exclude='clasifier\.\*'\) matches no key"):
        torch_parameter_transfer(Model(seed=3), path, {"exclude": ["clasifier.*"], "strict": True})
    assert report.warnings == ["TransferOptions(exclude='clasifier.*') matches no key of the file or the model"]


def test_a_loadable_with_its_own_hook_has_a_row_in_the_report(tmp_path, caplog):
    vocab = tmp_path / "src" / "vocab.txt"
    vocab.parent.mkdir()
    vocab.write_text("a b c")
    seen = []

    def read_vocab(obj, path):
        seen.append(pathlib.Path(path).read_text())

    source, target = Encoder(seed=1), Encoder(seed=2)
    pt = Pretrainer(
        tmp_path / "c",
        {"encoder": target, "tokenizer": object()},
        {"encoder": str(write(tmp_path / "src" / "e.ckpt", source.state_dict())), "tokenizer": str(vocab)},
        custom_hooks={"tokenizer": read_vocab},
    )
    pt.collect_files()
    with caplog.at_level(logging.INFO, logger="pl_pretrain"):
        reports = pt.load_collected()
    assert seen == ["a b c"] and reports["tokenizer"] is None  # the public return value is unchanged
    table = "\n".join(r.getMessage() for r in caplog.records)
    row = next(line for line in table.splitlines() if line.startswith("tokenizer "))
    assert row.split()[:2] == ["tokenizer", "hook"] and row.endswith(str(tmp_path / "c" / "tokenizer.ckpt"))
    assert "tokenizer: loaded by its hook" in table and "read_vocab" in table


# --------------------------------------------------------------------------------------------
# Shape policy and strictness
# --------------------------------------------------------------------------------------------


def test_a_shape_mismatch_is_an_error_naming_both_shapes_and_nothing_is_loaded(tmp_path):
    source, target = Model(seed=1, classes=10), Model(seed=2, classes=3)
    before = copy_of(target)
    with pytest.raises(TransferError) as caught:
        load(tmp_path, target, write(tmp_path / "src" / "m.ckpt", source.state_dict()))
    text = str(caught.value)
    assert "loadable 'encoder'" in text
    assert (
        "classifier.weight: file [10, 8] vs model [3, 8]" in text and "classifier.bias: file [10] vs model [3]" in text
    )
    assert "exclude=" in text and "on_mismatch='skip'" in text
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_skip_keeps_the_target_values_and_reports_both_shapes(tmp_path):
    source, target = Model(seed=1, classes=10), Model(seed=2, classes=3)
    before = copy_of(target)
    report = torch_parameter_transfer(
        target, write(tmp_path / "m.ckpt", source.state_dict()), TransferOptions(on_mismatch="skip")
    )
    assert same(source.encoder, target.encoder)
    assert torch.equal(target.classifier.weight, before["classifier.weight"])
    assert report.mismatched == {"classifier.weight": ((10, 8), (3, 8)), "classifier.bias": ((10,), (3,))}
    assert not report.complete
    assert TransferReport.to_dict(report)["mismatched"]["classifier.weight"] == [[10, 8], [3, 8]]


@pytest.mark.parametrize("what", ["missing", "unexpected", "mismatched"])
def test_strict_fails_on_anything_left_over_before_copying(tmp_path, what):
    source = Model(seed=1)
    state = source.state_dict()
    if what == "missing":
        del state["classifier.bias"]
    elif what == "unexpected":
        state["decoder.weight"] = torch.ones(2)
    else:
        state["classifier.bias"] = torch.ones(9)
    target = Model(seed=2)
    before = copy_of(target)
    options = TransferOptions(strict=True, on_mismatch="skip")
    with pytest.raises(TransferError, match=f"Strict transfer .* 1 {what}.*Nothing was loaded"):
        torch_parameter_transfer(target, write(tmp_path / "m.ckpt", state), options)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    # Keys left out on purpose never count against strictness (a pattern that matches nothing would).
    exclude = ["classifier.*", "decoder.*"] if what == "unexpected" else ["classifier.*"]
    report = torch_parameter_transfer(target, tmp_path / "m.ckpt", TransferOptions(strict=True, exclude=exclude))
    assert same(source.encoder, target.encoder) and report.complete


def test_the_default_loads_what_matches_and_warns_once_with_the_keys(tmp_path, caplog):
    source = Model(seed=1)
    state = source.state_dict()
    del state["classifier.bias"]
    state["decoder.weight"] = torch.ones(2)
    target = Model(seed=2)
    write(tmp_path / "src" / "model.ckpt", state)
    pretrainer = Pretrainer(tmp_path / "c", {"model": target})
    pretrainer.collect_files(default_source=tmp_path / "src")
    with caplog.at_level(logging.WARNING, logger="pl_pretrain"):
        report = pretrainer.load_collected()["model"]
    assert same(source.encoder, target.encoder) and torch.equal(source.classifier.weight, target.classifier.weight)
    assert report.missing == ["classifier.bias"] and report.unexpected == ["decoder.weight"]
    assert len(caplog.records) == 1  # one warning for the job, each odd key listed once
    assert caplog.text.count("classifier.bias") == 1 and caplog.text.count("decoder.weight") == 1
    assert "did not load completely into model" in caplog.text


# --------------------------------------------------------------------------------------------
# Safe loading and unreadable files
# --------------------------------------------------------------------------------------------


def _plant_marker(path: str) -> torch.Tensor:
    """What a malicious pickle would run: here it only leaves a file behind."""
    pathlib.Path(path).write_text("code from the checkpoint ran")
    return torch.zeros(1)


class _Payload:
    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return (_plant_marker, (str(self.path),))


@pytest.mark.parametrize("how", ["zip", "legacy"])
def test_a_pickle_that_runs_code_is_refused_and_never_run(tmp_path, how):
    marker = tmp_path / "pwned"
    state = {**Encoder(seed=1).state_dict(), "extra": _Payload(marker)}
    path = write(tmp_path / "src" / "encoder.ckpt", state, how)
    assert not marker.exists()
    target = Encoder(seed=2)
    with pytest.raises(UnsafeCheckpointError) as caught:
        load(tmp_path, target, path)
    text = str(caught.value)
    assert not marker.exists()
    assert f"{_plant_marker.__module__}._plant_marker" in text
    assert "loadable 'encoder'" in text and str(path.name) in text
    assert "TransferOptions(weights_only=False)" in text

    # The explicit, per-loadable opt-in (this is what it would do with a hostile file).
    report = load(tmp_path / "trusted", target, path, {"weights_only": False})
    assert marker.exists() and report.loaded


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"hello, I am a text file\n", "is not a checkpoint pl_pretrain can read"),
        (b'{"not": "an index"}', "is not a checkpoint pl_pretrain can read"),
        ("zip", "is a zip archive but not a PyTorch checkpoint"),
        ("list", "holds a builtins.list, not a state dict"),
        ("no-tensors", "holds a dict with no tensors in it"),
        ("truncated-safetensors", "Could not read .* as safetensors"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_names_the_key_and_the_file(tmp_path, content, message):
    path = tmp_path / "src" / "weights.bin"
    path.parent.mkdir()
    if content == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "not a model")
    elif content == "list":
        torch.save([torch.ones(2)], path)
    elif content == "no-tensors":
        torch.save({"epoch": 3, "lr": 0.1}, path)
    elif content == "truncated-safetensors":
        write(path, Encoder(seed=1).state_dict(), "safetensors")
        path.write_bytes(path.read_bytes()[:-20])
    else:
        path.write_bytes(content)
    with pytest.raises(TransferError, match=message) as caught:
        load(tmp_path, Encoder(seed=2), path)
    assert "loadable 'encoder'" in str(caught.value)
    assert "encoder.ckpt" in str(caught.value)  # the collected file, whatever the source was called


# --------------------------------------------------------------------------------------------
# Placement: dtype and device
# --------------------------------------------------------------------------------------------


def test_loading_into_bfloat16_from_a_float32_file(tmp_path):
    source = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    source[1].running_mean.normal_()
    state = source.state_dict()
    del state["2.bias"]
    target = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    weight = target[0].weight
    report = torch_parameter_transfer(target, write(tmp_path / "m.ckpt", state), TransferOptions(dtype="bfloat16"))
    assert target[0].weight is weight  # the same Parameter: an optimizer built before still sees it
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, source[0].weight.to(torch.bfloat16))
    assert target[1].running_mean.dtype == torch.bfloat16
    assert target[1].num_batches_tracked.dtype == torch.int64  # only floating-point tensors change
    assert target[2].bias.dtype == torch.bfloat16 and report.missing == ["2.bias"]  # not in the file, still moved
    assert report.bytes == sum(t.numel() * t.element_size() for n, t in target.state_dict().items() if n != "2.bias")


def test_a_model_built_on_the_meta_device_is_materialised_from_the_file(tmp_path):
    source = Encoder(seed=1)
    path = write(tmp_path / "m.ckpt", source.state_dict(), "safetensors")
    with torch.device("meta"):
        target = Encoder()
    with pytest.raises(TransferError, match="meta device"):
        torch_parameter_transfer(target, path)  # copying into meta tensors would silently do nothing
    report = torch_parameter_transfer(target, path, {"device": "cpu"})
    assert report.complete and same(source, target)


class Tied(torch.nn.Module):
    """A language-model shape: the output layer shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


class Rotary(torch.nn.Module):
    """A layer with a non-persistent buffer (as rotary embeddings keep their frequencies): in no checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("inv_freq", torch.empty(2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()
        with torch.no_grad():
            self.inv_freq.copy_(1.0 / 10000 ** (torch.arange(0, 4, 2).float() / 4))


def test_a_non_persistent_buffer_on_meta_gets_a_hint_that_can_be_followed(tmp_path):
    source = Rotary()
    path = write(tmp_path / "r.ckpt", source.state_dict())
    assert "inv_freq" not in torch.load(path)
    with torch.device("meta"):
        target = Rotary()
    with pytest.raises(TransferError, match="inv_freq") as raised:
        torch_parameter_transfer(target, path, {"device": "cpu"})
    hint = str(raised.value)
    assert "non-persistent buffer" in hint and "to_empty" in hint and "a file that holds" not in hint
    # Doing what it says loads the file and keeps the computed buffer.
    target.to_empty(device="cpu")
    target.reset_parameters()
    assert torch_parameter_transfer(target, path).complete
    assert same(source, target) and torch.equal(target.inv_freq, source.inv_freq)


def test_tied_weights_stored_under_one_name_fill_both(tmp_path):
    import huggingface_hub

    source = Tied()
    huggingface_hub.save_torch_state_dict(source.state_dict(), tmp_path)  # keeps one name of the two
    assert len(read_state_dict(tmp_path / "model.safetensors")[0]) == 1
    with torch.device("meta"):
        target = Tied()
    report = torch_parameter_transfer(target, tmp_path / "model.safetensors", {"device": "cpu"})
    assert report.complete and sorted(report.loaded) == ["embed.weight", "head.weight"]
    assert target.head.weight is target.embed.weight and torch.equal(target.embed.weight, source.embed.weight)


def test_options_come_from_plain_yaml_data_and_bad_values_say_what_to_change():
    options = TransferOptions(
        **{
            "include": ["encoder.*"],
            "exclude": "encoder.norm.*",
            "key_map": {"model.": ""},
            "dtype": "torch.float16",
            "device": "cpu",
        }
    )
    assert options.include == ("encoder.*",) and options.exclude == ("encoder.norm.*",)
    assert options.dtype is torch.float16 and options.device == torch.device("cpu")
    assert TransferOptions() == TransferOptions(on_mismatch="error", strict=False, weights_only=True, mmap=True)
    with pytest.raises(ConfigurationError, match="on_mismatch='ignore'.*'error', 'skip'"):
        TransferOptions(on_mismatch="ignore")
    with pytest.raises(ConfigurationError, match="not a floating-point torch dtype"):
        TransferOptions(dtype="int8")
    with pytest.raises(ConfigurationError, match="neither a mapping of prefixes"):
        TransferOptions(key_map=["model."])
    with pytest.raises(ConfigurationError, match="unknown field"):
        Pretrainer(loadables={"e": Encoder()}, transfer_options={"e": {"stict": True}})
    assert TransferOptions.coerce({"strict": True}).strict and TransferOptions.coerce(None) == TransferOptions()
    with pytest.raises(
        ConfigurationError,
        match=r"\[loadable 'e'\] transfer_options\['e'\] has an unknown field.*Known fields: include",
    ):
        TransferOptions.coerce({"stict": True}, key="e")
    with pytest.raises(TypeError):
        TransferOptions(True)  # keywords only: a positional True means nothing to a reader


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def test_the_report_and_its_table_say_what_happened_once(tmp_path):
    source = Model(seed=1, classes=10)
    state = {"model." + k: v for k, v in source.state_dict().items()}
    state["model.decoder.weight"] = torch.ones(3)
    for i in range(12):
        state[f"model.extra.{i}"] = torch.ones(1)
    path = write(tmp_path / "src" / "m.ckpt", state)
    target = Model(seed=2, classes=3)
    pt = Pretrainer(
        tmp_path / "c",
        {"model": target, "encoder": Encoder(seed=4)},
        {"model": str(path), "encoder": str(write(tmp_path / "src" / "e.ckpt", Encoder(seed=3).state_dict()))},
        transfer_options={
            "model": TransferOptions(key_map={"model.": ""}, on_mismatch="skip", exclude=["encoder.norm.*"])
        },
    )
    pt.collect_files()
    reports = pt.load_collected()
    report = reports["model"]
    assert report.source == tmp_path / "c" / "model.ckpt" and report.format == "torch"
    assert sorted(report.loaded) == ["encoder.proj.bias", "encoder.proj.weight"]
    assert report.missing == []
    assert report.unexpected == ["model.decoder.weight", *(f"model.extra.{i}" for i in range(12))]
    assert report.mismatched == {"classifier.weight": ((10, 8), (3, 8)), "classifier.bias": ((10,), (3,))}
    assert report.excluded == ["encoder.norm.weight", "encoder.norm.bias"]
    assert report.bytes == (8 * 8 + 8) * 4
    assert not report.complete and reports["encoder"].complete
    assert report.summary().startswith("2 loaded, 0 missing, 13 unexpected, 2 mismatched, 2 excluded")
    assert json.loads(json.dumps(report.to_dict()))["excluded"] == ["encoder.norm.weight", "encoder.norm.bias"]

    table = format_reports({**reports, "tokenizer": None})
    lines = table.splitlines()
    assert lines[0].split() == [
        "loadable",
        "format",
        "loaded",
        "missing",
        "unexpected",
        "mismatched",
        "excluded",
        "size",
        "source",
    ]
    assert lines[1].split()[:8] == ["model", "torch", "2", "0", "13", "2", "2", "288"]
    assert lines[2].split()[:3] == ["encoder", "torch", "4"]
    assert "tokenizer" not in table
    assert table.count("model.decoder.weight") == 1 and "(3 more)" in table
    assert "model: mismatched classifier.weight: file [10, 8] vs model [3, 8]" in table


def test_a_dense_transfer_does_not_import_dtensor(tmp_path):
    # Importing torch.distributed.tensor costs seconds (sympy, the op registry); a dense model
    # cannot hold a DTensor unless that module is already imported, so a dense load must not pay it.
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from pl_pretrain import torch_parameter_transfer\n"
        "m = torch.nn.Linear(4, 4)\n"
        f"torch.save(m.state_dict(), {str(tmp_path / 'm.ckpt')!r})\n"
        f"torch_parameter_transfer(m, {str(tmp_path / 'm.ckpt')!r})\n"
        "print('torch.distributed.tensor' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
