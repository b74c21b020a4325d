"""Pretrainer in one process: SpeechBrain's API, name for name, and every misuse's error text.

Ports SpeechBrain's tests/unittests/test_pretrainer.py and goes past it: every source kind, paths
against default_source, conditions, custom hooks, decorated classes, repeated collections.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
from helpers import ckpt_bytes, module, same, save

from pl_pretrain import (
    DEFAULT_LOAD_HOOKS,
    DEFAULT_TRANSFER_HOOKS,
    FetchConfig,
    FetchFrom,
    FetchSource,
    LocalStrategy,
    Pretrainer,
    PretrainerError,
    TransferReport,
    mark_as_loader,
    mark_as_transfer,
    register_checkpoint_hooks,
)
from pl_pretrain.errors import ConfigurationError, FetchError, TransferError


def test_speechbrain_pretrainer_scenario(tmp_path):
    # SpeechBrain's test_pretrainer, verbatim in spirit.
    first_model = torch.nn.Linear(32, 32)
    pretrained_dir = tmp_path / "original"
    save(first_model, pretrained_dir / "model.ckpt")
    pretrained_model = torch.nn.Linear(32, 32)
    assert not torch.equal(pretrained_model.weight, first_model.weight)
    pt = Pretrainer(collect_in=tmp_path / "reused", loadables={"model": pretrained_model})
    pt.collect_files(default_source=pretrained_dir)
    pt.load_collected()
    assert torch.equal(pretrained_model.weight, first_model.weight)


def test_default_collect_in():
    assert Pretrainer().collect_in == pathlib.Path("./model_checkpoints")


def test_files_are_collected_as_key_ckpt(tmp_path):
    save(module(1), tmp_path / "src" / "whatever-name.pt")
    pt = Pretrainer(tmp_path / "c", {"encoder": module(2)}, {"encoder": str(tmp_path / "src" / "whatever-name.pt")})
    paths = pt.collect_files()
    assert paths == {"encoder": (tmp_path / "c" / "encoder.ckpt").absolute()}
    assert pt.loadable_paths == paths


@pytest.mark.parametrize("kind", ["local", "url", "hub"])
@pytest.mark.parametrize("strategy", list(LocalStrategy))
def test_every_source_kind_with_every_strategy(tmp_path, http_server, hub, kind, strategy):
    source_model, target = module(1), module(2)
    data = ckpt_bytes(source_model)
    if kind == "local":
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / "encoder.ckpt").write_bytes(data)
        default_source = str(tmp_path / "src")
    elif kind == "url":
        http_server.add("models/encoder.ckpt", data)
        default_source = f"{http_server.url}/models"
    else:
        hub.add_file("org/model", "encoder.ckpt", data)
        default_source = "org/model"
    pt = Pretrainer(tmp_path / "c", {"encoder": target})
    paths = pt.collect_files(default_source=default_source, local_strategy=strategy)
    reports = pt.load_collected()
    assert same(source_model, target)
    assert paths["encoder"].is_file()
    assert isinstance(reports["encoder"], TransferReport)
    assert reports["encoder"].complete and len(reports["encoder"].loaded) == 4


def test_paths_win_over_default_source(tmp_path, hub):
    wanted, unwanted = module(1), module(9)
    save(unwanted, tmp_path / "default" / "encoder.ckpt")
    save(unwanted, tmp_path / "default" / "decoder.ckpt")
    hub.add_file("org/asr", "enc.ckpt", ckpt_bytes(wanted))
    enc, dec = module(2), module(3)
    pt = Pretrainer(tmp_path / "c", {"encoder": enc, "decoder": dec}, paths={"encoder": "org/asr/enc.ckpt"})
    pt.collect_files(default_source=tmp_path / "default")
    pt.load_collected()
    assert same(enc, wanted) and same(dec, unwanted)


def test_missing_path_and_no_default_source_names_the_key(tmp_path):
    pt = Pretrainer(tmp_path / "c", {"encoder": module(1)})
    with pytest.raises(ConfigurationError, match="No path for 'encoder' and no default_source") as info:
        pt.collect_files()
    assert info.value.key == "encoder" and "default_source=" in str(info.value)


def test_conditions_skip_fetch_and_load(tmp_path, http_server):
    http_server.add("m/lm.ckpt", ckpt_bytes(module(1)))
    http_server.add("m/encoder.ckpt", ckpt_bytes(module(2)))
    lm, enc = module(5), module(6)
    lm_before = {k: v.clone() for k, v in lm.state_dict().items()}
    calls = []
    pt = Pretrainer(
        tmp_path / "c",
        {"lm": lm, "encoder": enc},
        conditions={"lm": lambda: calls.append(1) or False, "encoder": True},
    )
    assert pt.collect_files(default_source=f"{http_server.url}/m").keys() == {"encoder"}
    pt.load_collected()
    assert not pt.is_loadable("lm") and pt.is_loadable("encoder")
    assert http_server.count("GET", "lm.ckpt") == 0
    assert all(torch.equal(lm.state_dict()[k], v) for k, v in lm_before.items())
    assert same(enc, module(2)) and calls


def test_custom_hook_comes_first(tmp_path):
    save(module(1), tmp_path / "src" / "encoder.ckpt")
    seen = []
    pt = Pretrainer(
        tmp_path / "c", {"encoder": module(2)}, custom_hooks={"encoder": lambda obj, path: seen.append((obj, path))}
    )
    pt.collect_files(default_source=tmp_path / "src")
    assert pt.load_collected() == {"encoder": None}
    assert seen == [(pt.loadables["encoder"], pt.loadable_paths["encoder"])]


def test_custom_hook_must_be_callable():
    with pytest.raises(ConfigurationError, match="not a function"):
        Pretrainer(loadables={"x": module(1)}, custom_hooks={"x": "not-a-hook"})


@register_checkpoint_hooks
class Vocab:
    def __init__(self):
        self.words: list[str] = []

    @mark_as_transfer
    def _load(self, path):
        self.words = pathlib.Path(path).read_text().split()


@register_checkpoint_hooks
class Counter:
    def __init__(self):
        self.value = 0
        self.end_of_epoch = None

    @mark_as_loader
    def _recover(self, path, end_of_epoch):
        self.value = int(pathlib.Path(path).read_text())
        self.end_of_epoch = end_of_epoch


class SubVocab(Vocab):
    pass


def test_decorated_classes_load_themselves(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "vocab.ckpt").write_text("a b c")
    (tmp_path / "src" / "sub.ckpt").write_text("x y")
    (tmp_path / "src" / "counter.ckpt").write_text("42")
    vocab, sub, counter = Vocab(), SubVocab(), Counter()
    pt = Pretrainer(tmp_path / "c", {"vocab": vocab, "sub": sub, "counter": counter})
    pt.collect_files(default_source=tmp_path / "src")
    assert pt.load_collected() == {"vocab": None, "sub": None, "counter": None}
    assert vocab.words == ["a", "b", "c"]
    assert sub.words == ["x", "y"]  # found along the MRO
    assert counter.value == 42 and counter.end_of_epoch is False
    assert DEFAULT_TRANSFER_HOOKS[Vocab] is Vocab.__dict__["_load"]
    assert DEFAULT_LOAD_HOOKS[Counter] is Counter.__dict__["_recover"]


def test_hook_signature_is_checked_when_the_class_is_decorated():
    with pytest.raises(ConfigurationError, match=r"@mark_as_transfer needs a method callable as .*\(self, path\)"):

        class Bad:  # noqa: F841
            @mark_as_transfer
            def load(self, path, device, extra):
                pass

    with pytest.raises(ConfigurationError, match="@mark_as_loader"):

        class BadLoader:  # noqa: F841
            @mark_as_loader
            def load(self, path):
                pass

    # As in SpeechBrain, a class with no marked method is accepted, and nothing is registered for it.
    @register_checkpoint_hooks
    class Nothing:
        pass

    assert Nothing not in DEFAULT_TRANSFER_HOOKS and Nothing not in DEFAULT_LOAD_HOOKS


def test_unknown_type_names_the_type_and_the_key(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "thing.ckpt").write_text("x")
    pt = Pretrainer(tmp_path / "c", {"thing": object()})
    pt.collect_files(default_source=tmp_path / "src")
    with pytest.raises(ConfigurationError, match="Don't know how to load a builtins.object") as info:
        pt.load_collected()
    assert info.value.key == "thing" and "custom_hooks" in str(info.value)


def test_failing_hook_names_key_and_file(tmp_path):
    save(module(1), tmp_path / "src" / "encoder.ckpt")

    def broken(obj, path):
        raise KeyError("no such layer")

    pt = Pretrainer(tmp_path / "c", {"encoder": module(2)}, custom_hooks={"encoder": broken})
    pt.collect_files(default_source=tmp_path / "src")
    with pytest.raises(TransferError, match="KeyError: 'no such layer'") as info:
        pt.load_collected()
    assert info.value.key == "encoder" and str(tmp_path / "src") in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("sb/asr-crdnn-libri/lm.ckpt", ("sb/asr-crdnn-libri", "lm.ckpt")),
        ("lm.ckpt", ("./", "lm.ckpt")),
        ("/abs/dir/lm.ckpt", ("/abs/dir", "lm.ckpt")),
        ("https://host.org/models/asr/lm.ckpt", ("https://host.org/models/asr", "lm.ckpt")),
        (pathlib.Path("rel/dir/enc.pt"), ("rel/dir", "enc.pt")),
        (
            FetchSource(FetchFrom.HUGGING_FACE, "org/repo/enc.ckpt"),
            (FetchSource(FetchFrom.HUGGING_FACE, "org/repo"), "enc.ckpt"),
        ),
    ],
)
def test_split_path(path, expected):
    assert Pretrainer.split_path(path) == expected


def test_fetch_source_keeps_its_kind(tmp_path, hub):
    # A folder named like a repo id exists locally, but the FetchSource pins the Hub.
    hub.add_file("org/asr", "enc.ckpt", ckpt_bytes(module(1)))
    target = module(2)
    pt = Pretrainer(tmp_path / "c", {"enc": target}, {"enc": FetchSource(FetchFrom.HUGGING_FACE, "org/asr/enc.ckpt")})
    pt.collect_files()
    pt.load_collected()
    assert same(target, module(1)) and hub.downloads() == 1


def test_relative_paths_resolve_against_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save(module(1), tmp_path / "enc.ckpt")
    target = module(2)
    pt = Pretrainer("c", {"enc": target}, {"enc": "enc.ckpt"})
    pt.collect_files()
    pt.load_collected()
    assert same(target, module(1))


def test_repeated_collections_fetch_once(tmp_path, http_server, hub):
    http_server.add("m/a.ckpt", ckpt_bytes(module(1)))
    hub.add_file("org/m", "b.ckpt", ckpt_bytes(module(2)))
    pt = Pretrainer(tmp_path / "c", {"a": module(3), "b": module(4)}, {"b": "org/m/b.ckpt"})
    first = pt.collect_files(default_source=f"{http_server.url}/m")
    second = pt.collect_files(default_source=f"{http_server.url}/m")
    assert first == second
    assert http_server.count("GET") == 1 and hub.downloads() == 1
    pt.load_collected()
    assert same(pt.loadables["a"], module(1)) and same(pt.loadables["b"], module(2))


def test_collect_in_none_loads_from_where_files_live(tmp_path, http_server, hub):
    save(module(1), tmp_path / "src" / "a.ckpt")
    http_server.add("m/b.ckpt", ckpt_bytes(module(2)))
    hub.add_file("org/m", "c.ckpt", ckpt_bytes(module(3)))
    a, b, c = module(4), module(5), module(6)
    pt = Pretrainer(None, {"a": a, "b": b, "c": c}, {"b": f"{http_server.url}/m/b.ckpt", "c": "org/m/c.ckpt"})
    paths = pt.collect_files(default_source=tmp_path / "src")
    assert paths["a"] == (tmp_path / "src" / "a.ckpt").absolute()
    assert "snapshots" in str(paths["c"])
    pt.load_collected()
    assert same(a, module(1)) and same(b, module(2)) and same(c, module(3))


def test_set_collect_in(tmp_path):
    save(module(1), tmp_path / "src" / "a.ckpt")
    pt = Pretrainer(tmp_path / "first", {"a": module(2)})
    pt.set_collect_in(tmp_path / "second")
    assert pt.collect_files(default_source=tmp_path / "src")["a"].parent == (tmp_path / "second").absolute()


def test_add_methods_accumulate(tmp_path):
    save(module(1), tmp_path / "src" / "x.ckpt")
    pt = Pretrainer(tmp_path / "c")
    pt.add_loadables({"a": module(2)})
    pt.add_loadables({"b": module(3)})
    pt.add_paths({"a": str(tmp_path / "src" / "x.ckpt")})
    pt.add_paths({"b": str(tmp_path / "src" / "x.ckpt")})
    pt.add_conditions({"b": False})
    pt.add_custom_hooks({"a": lambda obj, path: None})
    assert set(pt.loadables) == {"a", "b"} and pt.collect_files().keys() == {"a"}


def test_unknown_keys_in_paths_are_a_clear_error(tmp_path):
    pt = Pretrainer(tmp_path / "c", {"encoder": module(1)}, paths={"encodr": "org/m/enc.ckpt"})
    with pytest.raises(
        ConfigurationError, match="paths names 'encodr', which is not among the loadables \\(encoder\\)"
    ):
        pt.collect_files(default_source="org/m")


@pytest.mark.parametrize("key", ["../escape", "a/b", "", ".pl_pretrain", "..", ".", "a\\b", "nul\x00"])
def test_loadable_keys_cannot_leave_the_collection_folder(key):
    with pytest.raises(ConfigurationError, match="not a plain file name"):
        Pretrainer(loadables={key: module(1)})


def test_load_without_collect_uses_the_folder(tmp_path):
    # SpeechBrain's run_on_main(collect_files) pattern: other ranks only call load_collected().
    save(module(1), tmp_path / "src" / "a.ckpt")
    Pretrainer(tmp_path / "c", {"a": module(2)}).collect_files(default_source=tmp_path / "src")
    target = module(3)
    Pretrainer(tmp_path / "c", {"a": target}).load_collected()
    assert same(target, module(1))


def test_load_without_anything_collected(tmp_path):
    with pytest.raises(ConfigurationError, match="collect_files\\(\\) was not called") as info:
        Pretrainer(tmp_path / "empty", {"a": module(1)}).load_collected()
    assert info.value.key == "a"


def test_internal_ddp_handling_in_one_process(tmp_path):
    save(module(1), tmp_path / "src" / "a.ckpt")
    target = module(2)
    pt = Pretrainer(tmp_path / "c", {"a": target})
    pt.collect_files(default_source=tmp_path / "src", internal_ddp_handling=True)
    pt.load_collected()
    assert same(target, module(1))


def test_fetch_errors_name_key_source_and_file(tmp_path, http_server):
    pt = Pretrainer(tmp_path / "c", {"encoder": module(1)})
    with pytest.raises(FetchError) as info:
        pt.collect_files(default_source=f"{http_server.url}/models")
    text = str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, PretrainerError)
    assert "loadable 'encoder'" in text and f"{http_server.url}/models" in text and "encoder.ckpt" in text
    assert "HTTP 404" in text


def test_bad_collect_per_node(tmp_path):
    with pytest.raises(ConfigurationError, match="collect_per_node='yes' must be True, False or 'auto'"):
        Pretrainer(tmp_path, {"a": module(1)}).collect_files(default_source=tmp_path, collect_per_node="yes")


def test_bad_fetch_config(tmp_path):
    with pytest.raises(ConfigurationError, match="not a FetchConfig"):
        Pretrainer(tmp_path, {"a": module(1)}).collect_files(default_source=tmp_path, fetch_config={"overwrite": True})


def test_provenance_says_where_weights_came_from(tmp_path, hub):
    commit = hub.add_file("org/asr", "enc.ckpt", ckpt_bytes(module(1)))
    pt = Pretrainer(tmp_path / "c", {"enc": module(2)}, {"enc": "org/asr/enc.ckpt"})
    pt.collect_files(fetch_config=FetchConfig(revision="main"))
    pt.load_collected()
    record = pt.provenance()["enc"]
    assert record["source"] == "org/asr" and record["filename"] == "enc.ckpt"
    assert record["commit"] == commit and record["revision"] == "main"
    assert len(record["sha256"]) == 64
    assert record["report"]["loaded"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
