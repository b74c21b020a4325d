"""SpeechBrain's own behaviours, restated, run against SpeechBrain and against pl_pretrain.

Each test states one behaviour of SpeechBrain's ``fetch``, checkpoint hooks or ``Pretrainer``
(ported from SpeechBrain's tests/unittests/test_checkpoints.py, test_pretrainer.py and
test_fetch.py, and from what SpeechBrain 1.1's code does) and runs twice: ``[speechbrain]`` on
the real package proves the statement is SpeechBrain's, ``[pl_pretrain]`` proves we keep it.
The behaviours pl_pretrain changes on purpose are not here; docs/migration.md lists them.

SpeechBrain imports torchaudio, which cannot be installed beside torch 2.13.0: the import-only
stand-in in tests/stubs/ is used when the real one does not load (see speechbrain_system.py);
nothing here reads audio.
"""

from __future__ import annotations

import pathlib
from types import SimpleNamespace

import pytest
import torch
from helpers import module, same, save
from speechbrain_system import use_torchaudio_stand_in

use_torchaudio_stand_in()
pytest.importorskip("speechbrain", reason="the SpeechBrain tests need the 'speechbrain' extra")
sentencepiece = pytest.importorskip("sentencepiece")


def _speechbrain() -> SimpleNamespace:
    from speechbrain.utils import checkpoints, fetching, parameter_transfer

    return SimpleNamespace(
        name="speechbrain",
        Pretrainer=parameter_transfer.Pretrainer,
        register_checkpoint_hooks=checkpoints.register_checkpoint_hooks,
        mark_as_saver=checkpoints.mark_as_saver,
        mark_as_loader=checkpoints.mark_as_loader,
        mark_as_transfer=checkpoints.mark_as_transfer,
        fetch=fetching.fetch,
        guess_source=fetching.guess_source,
        FetchConfig=fetching.FetchConfig,
        FetchFrom=fetching.FetchFrom,
        FetchSource=fetching.FetchSource,
        LocalStrategy=fetching.LocalStrategy,
    )


def _pl_pretrain() -> SimpleNamespace:
    import pl_pretrain

    names = ("Pretrainer", "register_checkpoint_hooks", "mark_as_loader", "mark_as_transfer", "fetch", "guess_source")
    return SimpleNamespace(
        name="pl_pretrain",
        # getattr: a missing name fails its own test, not the whole module's collection.
        mark_as_saver=getattr(pl_pretrain, "mark_as_saver", None),
        FetchConfig=pl_pretrain.FetchConfig,
        FetchFrom=pl_pretrain.FetchFrom,
        FetchSource=pl_pretrain.FetchSource,
        LocalStrategy=pl_pretrain.LocalStrategy,
        **{name: getattr(pl_pretrain, name) for name in names},
    )


@pytest.fixture(params=["speechbrain", "pl_pretrain"])
def impl(request) -> SimpleNamespace:
    """The package under test: SpeechBrain itself, or pl_pretrain under SpeechBrain's names."""
    return _speechbrain() if request.param == "speechbrain" else _pl_pretrain()


def _saved_text(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# The Pretrainer (test_pretrainer.py and parameter_transfer.py)
# --------------------------------------------------------------------------------------------


def test_pretrainer_collects_and_loads_a_module(impl, tmp_path):
    first = torch.nn.Linear(32, 32)
    save(first, tmp_path / "original" / "model.ckpt")
    target = torch.nn.Linear(32, 32)
    assert not torch.equal(target.weight, first.weight)
    pt = impl.Pretrainer(collect_in=tmp_path / "reused", loadables={"model": target})
    pt.collect_files(default_source=tmp_path / "original")
    pt.load_collected()
    assert torch.equal(target.weight, first.weight)


def test_collect_files_returns_each_key_as_key_ckpt_in_collect_in(impl, tmp_path):
    save(module(1), tmp_path / "src" / "weights.pt")
    pt = impl.Pretrainer(tmp_path / "c", {"enc": module(2)}, {"enc": str(tmp_path / "src" / "weights.pt")})
    paths = pt.collect_files()
    assert {k: pathlib.Path(v) for k, v in paths.items()} == {"enc": (tmp_path / "c" / "enc.ckpt").absolute()}


def test_paths_point_at_the_collected_file_after_collect_files(impl, tmp_path):
    save(module(1), tmp_path / "src" / "weights.pt")
    pt = impl.Pretrainer(tmp_path / "c", {"enc": module(2)}, {"enc": str(tmp_path / "src" / "weights.pt")})
    paths = pt.collect_files()
    assert pt.paths["enc"] == str(paths["enc"])
    # and collecting again from there still works (the file is its own source now)
    pt.collect_files()
    pt.load_collected()
    assert same(pt.loadables["enc"], module(1))


def test_collect_files_positional_local_strategy(impl, tmp_path):
    # SpeechBrain >= 1.0.4: collect_files(default_source, local_strategy, fetch_config)
    save(module(1), tmp_path / "src" / "enc.ckpt")
    pt = impl.Pretrainer(tmp_path / "c", {"enc": module(2)})
    pt.collect_files(str(tmp_path / "src"), impl.LocalStrategy.COPY)
    placed = tmp_path / "c" / "enc.ckpt"
    assert placed.is_file() and not placed.is_symlink()


def test_collect_files_three_positionals(impl, tmp_path):
    save(module(1), tmp_path / "src" / "enc.ckpt")
    pt = impl.Pretrainer(tmp_path / "c", {"enc": module(2)})
    pt.collect_files(str(tmp_path / "src"), impl.LocalStrategy.SYMLINK, impl.FetchConfig())
    assert (tmp_path / "c" / "enc.ckpt").is_symlink()
    pt.load_collected()
    assert same(pt.loadables["enc"], module(1))


def test_false_condition_skips_fetch_and_load(impl, tmp_path):
    save(module(1), tmp_path / "src" / "a.ckpt")
    target = module(2)
    pt = impl.Pretrainer(tmp_path / "c", {"a": target, "b": module(3)}, conditions={"b": lambda: False})
    paths = pt.collect_files(default_source=str(tmp_path / "src"))
    pt.load_collected()
    assert set(paths) == {"a"} and same(target, module(1))


def test_no_path_and_no_default_source_is_a_value_error(impl, tmp_path):
    pt = impl.Pretrainer(tmp_path / "c", {"a": module(1)})
    with pytest.raises(ValueError):
        pt.collect_files()


def test_split_path(impl):
    assert tuple(impl.Pretrainer.split_path("sb/asr/lm.ckpt")) == ("sb/asr", "lm.ckpt")
    assert tuple(impl.Pretrainer.split_path("lm.ckpt")) == ("./", "lm.ckpt")
    source, filename = impl.Pretrainer.split_path(impl.FetchSource(impl.FetchFrom.HUGGING_FACE, "org/repo/lm.ckpt"))
    assert source == impl.FetchSource(impl.FetchFrom.HUGGING_FACE, "org/repo") and filename == "lm.ckpt"


def test_load_collected_without_collect_files_reads_collect_in(impl, tmp_path):
    # What the other ranks do in SpeechBrain's run_on_main(pretrainer.collect_files) pattern.
    save(module(1), tmp_path / "src" / "a.ckpt")
    impl.Pretrainer(tmp_path / "c", {"a": module(2)}).collect_files(default_source=str(tmp_path / "src"))
    target = module(3)
    impl.Pretrainer(tmp_path / "c", {"a": target}).load_collected()
    assert same(target, module(1))


def test_module_transfer_is_not_strict(impl, tmp_path):
    source = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    state = source.state_dict()
    state.pop("1.bias")
    state["extra.weight"] = torch.zeros(1)
    (tmp_path / "src").mkdir()
    torch.save(state, tmp_path / "src" / "m.ckpt")
    target = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    pt = impl.Pretrainer(tmp_path / "c", {"m": target})
    pt.collect_files(default_source=str(tmp_path / "src"))
    pt.load_collected()
    assert torch.equal(target[0].weight, source[0].weight) and torch.equal(target[1].weight, source[1].weight)


class _Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.multihead_attn = torch.nn.Linear(3, 3)
        self.convs_intermediate = torch.nn.Linear(3, 3)


@pytest.mark.parametrize("old", [".mutihead_attn", ".convs_intermedite"])
def test_legacy_speechbrain_keys_are_renamed_on_transfer(impl, tmp_path, old):
    # speechbrain.utils.checkpoints.KEYS_MAPPING, applied by torch_parameter_transfer
    source = torch.nn.Sequential(_Attention())
    new = {".mutihead_attn": ".multihead_attn", ".convs_intermedite": ".convs_intermediate"}[old]
    state = {key.replace(new, old): value for key, value in source.state_dict().items()}
    assert any(old in key for key in state)
    (tmp_path / "src").mkdir()
    torch.save(state, tmp_path / "src" / "m.ckpt")
    target = torch.nn.Sequential(_Attention())
    pt = impl.Pretrainer(tmp_path / "c", {"m": target})
    pt.collect_files(default_source=str(tmp_path / "src"))
    pt.load_collected()
    assert same(target, source)


# --------------------------------------------------------------------------------------------
# Checkpoint hooks (test_checkpoints.py and checkpoints.py)
# --------------------------------------------------------------------------------------------


def test_registered_loader_hook_loads_a_custom_object(impl, tmp_path):
    @impl.register_checkpoint_hooks
    class Counter:
        def __init__(self, value: int) -> None:
            self.value = value
            self.end_of_epoch = None

        @impl.mark_as_saver
        def save(self, path):
            pathlib.Path(path).write_text(str(self.value))

        @impl.mark_as_loader
        def load(self, path, end_of_epoch):
            self.value = int(pathlib.Path(path).read_text())
            self.end_of_epoch = end_of_epoch

    (tmp_path / "src").mkdir()
    Counter(7).save(tmp_path / "src" / "counter.ckpt")
    target = Counter(0)
    pt = impl.Pretrainer(tmp_path / "c", {"counter": target})
    pt.collect_files(default_source=str(tmp_path / "src"))
    pt.load_collected()
    assert target.value == 7 and target.end_of_epoch is False


def test_transfer_hook_wins_over_loader_hook(impl, tmp_path):
    @impl.register_checkpoint_hooks
    class Both:
        def __init__(self) -> None:
            self.called = None

        @impl.mark_as_transfer
        def transfer(self, path):
            self.called = "transfer"

        @impl.mark_as_loader
        def load(self, path, end_of_epoch):
            self.called = "loader"

    _saved_text(tmp_path / "src" / "x.ckpt", "x")
    target = Both()
    pt = impl.Pretrainer(tmp_path / "c", {"x": target})
    pt.collect_files(default_source=str(tmp_path / "src"))
    pt.load_collected()
    assert target.called == "transfer"


def test_hooks_are_found_along_the_mro(impl, tmp_path):
    @impl.register_checkpoint_hooks
    class Base:
        @impl.mark_as_transfer
        def transfer(self, path):
            self.text = pathlib.Path(path).read_text()

    class Child(Base):
        pass

    _saved_text(tmp_path / "src" / "x.ckpt", "from the file")
    target = Child()
    pt = impl.Pretrainer(tmp_path / "c", {"x": target})
    pt.collect_files(default_source=str(tmp_path / "src"))
    pt.load_collected()
    assert target.text == "from the file"


def test_custom_hook_wins_over_registered_hook(impl, tmp_path):
    @impl.register_checkpoint_hooks
    class Thing:
        called = None

        @impl.mark_as_transfer
        def transfer(self, path):
            self.called = "registered"

    def custom(obj, path):
        obj.called = "custom"

    _saved_text(tmp_path / "src" / "x.ckpt", "x")
    target = Thing()
    pt = impl.Pretrainer(tmp_path / "c", {"x": target}, custom_hooks={"x": custom})
    pt.collect_files(default_source=str(tmp_path / "src"))
    pt.load_collected()
    assert target.called == "custom"


def test_bad_loader_signature_is_a_type_error(impl):
    with pytest.raises(TypeError):

        class Bad:
            @impl.mark_as_loader
            def load(self, path):  # missing end_of_epoch
                pass


def test_bad_saver_signature_is_a_type_error(impl):
    assert impl.mark_as_saver is not None, "mark_as_saver is missing"
    with pytest.raises(TypeError):

        class Bad:
            @impl.mark_as_saver
            def save(self, path, extra_arg):
                pass


def test_bad_transfer_signature_is_a_type_error(impl):
    with pytest.raises(TypeError):

        class Bad:
            @impl.mark_as_transfer
            def transfer(self):
                pass


def test_register_accepts_a_class_without_marked_methods(impl):
    class Plain:
        pass

    assert impl.register_checkpoint_hooks(Plain) is Plain


def test_register_takes_save_on_main_only(impl, tmp_path):
    assert impl.mark_as_saver is not None, "mark_as_saver is missing"

    class Gathered:
        @impl.mark_as_saver
        def save(self, path):
            pass

        @impl.mark_as_loader
        def load(self, path, end_of_epoch):
            self.loaded = pathlib.Path(path).read_text()

    assert impl.register_checkpoint_hooks(Gathered, save_on_main_only=False) is Gathered
    _saved_text(tmp_path / "src" / "g.ckpt", "gathered")
    target = Gathered()
    pt = impl.Pretrainer(tmp_path / "c", {"g": target})
    pt.collect_files(default_source=str(tmp_path / "src"))
    pt.load_collected()
    assert target.loaded == "gathered"


def test_grad_scaler_has_a_default_hook(impl, tmp_path):
    trained = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    (tmp_path / "src").mkdir()
    torch.save(trained.state_dict(), tmp_path / "src" / "scaler.ckpt")
    target = torch.amp.GradScaler("cpu")
    pt = impl.Pretrainer(tmp_path / "c", {"scaler": target})
    pt.collect_files(default_source=str(tmp_path / "src"))
    pt.load_collected()
    assert target.get_scale() == 512.0 and target.get_growth_interval() == 7


def _tokenizer_file(folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "text.txt").write_text("a tiny text for a tiny tokenizer\nanother tiny line of text\n" * 10)
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "text.txt"),
        model_prefix=str(folder / "tok"),
        vocab_size=20,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (folder / "tok.model").rename(folder / "tokenizer.ckpt")
    return folder / "tokenizer.ckpt"


def test_sentencepiece_has_a_default_hook(impl, tmp_path):
    trained = sentencepiece.SentencePieceProcessor(model_file=str(_tokenizer_file(tmp_path / "src")))
    target = sentencepiece.SentencePieceProcessor()
    pt = impl.Pretrainer(tmp_path / "c", {"tokenizer": target})
    pt.collect_files(default_source=str(tmp_path / "src"))
    pt.load_collected()
    assert target.get_piece_size() == trained.get_piece_size()
    assert target.encode_as_pieces("another tiny text") == trained.encode_as_pieces("another tiny text")


# --------------------------------------------------------------------------------------------
# fetch (test_fetch.py and fetching.py)
# --------------------------------------------------------------------------------------------


def test_guess_source(impl, tmp_path):
    assert impl.guess_source(str(tmp_path))[0] == impl.FetchFrom.LOCAL
    assert impl.guess_source("http://example.com")[0] == impl.FetchFrom.URI
    assert impl.guess_source("facebook/wav2vec2-base-960h")[0] == impl.FetchFrom.HUGGING_FACE


def test_fetch_a_local_file_by_copy(impl, tmp_path):
    _saved_text(tmp_path / "src" / "foo.txt", "abc123")
    out = impl.fetch(
        "foo.txt", str(tmp_path / "src"), savedir=str(tmp_path / "dest"), local_strategy=impl.LocalStrategy.COPY
    )
    assert pathlib.Path(out).read_text() == "abc123" and pathlib.Path(out).parent == tmp_path / "dest"
    assert not pathlib.Path(out).is_symlink()


def test_fetch_a_url_without_network_is_a_value_error(impl, tmp_path):
    with pytest.raises(ValueError):
        impl.fetch(
            "foo.txt",
            "http://example.com",
            savedir=str(tmp_path / "dest"),
            fetch_config=impl.FetchConfig(allow_network=False),
        )


def test_fetch_source_is_hashable_by_path_and_encodes(impl):
    source = impl.FetchSource(impl.FetchFrom.HUGGING_FACE, "org/repo")
    assert hash(source) == hash("org/repo")
    assert {source: 1}[impl.FetchSource(impl.FetchFrom.HUGGING_FACE, "org/repo")] == 1
    assert source.encode() == b"org/repo_FetchFrom.HUGGING_FACE"
    assert source.encode("ascii") == b"org/repo_FetchFrom.HUGGING_FACE"


def test_fetch_config_defaults(impl):
    config = impl.FetchConfig()
    assert (config.overwrite, config.allow_updates, config.allow_network) == (False, False, True)
    assert (config.revision, config.huggingface_cache_dir) == (None, None)
