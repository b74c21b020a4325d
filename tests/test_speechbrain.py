"""A SpeechBrain user switches with one line: real SpeechBrain YAMLs, classes and entry points.

A small SpeechBrain system (an SB ``Linear``/``BatchNorm1d`` model, ``InputNormalization``,
``CategoricalEncoder`` and a SentencePiece tokenizer) is trained a few steps and saved with
SpeechBrain's own ``Checkpointer`` (tests/speechbrain_system.py). Its inference YAML is loaded
by HyperPyYAML twice, differing only in the Pretrainer's tag: SpeechBrain's load and ours must
hold identical tensors, statistics, label maps, vocabulary and outputs: directly, through
SpeechBrain's ``Pretrained.from_hparams``, under SpeechBrain's ``run_on_main`` on 2 gloo ranks,
and in a 2-rank Lightning fit with `PretrainerCallback`.

SpeechBrain imports torchaudio, which cannot be installed beside torch 2.13.0: the import-only
stand-in in tests/stubs/ is used when the real one does not load; no code path here reads audio.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from dist import assert_all_ok, run_ranks
from helpers import module, same, save
from speechbrain_system import (
    KEYS,
    OUR_PRETRAINER,
    SB_PRETRAINER,
    differences,
    inference_yaml,
    load_yaml,
    publish,
    run_on_main_job,
    snapshot,
    use_torchaudio_stand_in,
)

use_torchaudio_stand_in()
pytest.importorskip("speechbrain", reason="the SpeechBrain tests need the 'speechbrain' extra")
pytest.importorskip("hyperpyyaml")

from speechbrain.utils import fetching as sb_fetching  # noqa: E402

from pl_pretrain import FetchConfig, LocalStrategy, Pretrainer, fetch  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ALL_SAME = dict.fromkeys(["model tensors", "normaliser statistics", "label map", "vocabulary", "forward outputs"], True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> pathlib.Path:
    """A SpeechBrain model repository, trained and saved by SpeechBrain."""
    return publish(tmp_path_factory.mktemp("sb") / "repo")


@pytest.fixture(scope="module")
def reference(repo, tmp_path_factory) -> dict:
    """What SpeechBrain's own Pretrainer loads from `repo`."""
    hparams = load_yaml(SB_PRETRAINER, tmp_path_factory.mktemp("sb_load"))
    hparams["pretrainer"].collect_files(default_source=str(repo))
    hparams["pretrainer"].load_collected()
    return snapshot(hparams)


def _our_repo(repo: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """The same repository, its hyperparams.yaml with the one changed line."""
    shutil.copytree(repo, folder, ignore=shutil.ignore_patterns("checkpoints"))
    (folder / "hyperparams.yaml").write_text(inference_yaml(OUR_PRETRAINER))
    return folder


def test_the_yamls_differ_in_one_line():
    sb, ours = inference_yaml(SB_PRETRAINER).splitlines(), inference_yaml(OUR_PRETRAINER).splitlines()
    changed = [(a, b) for a, b in zip(sb, ours, strict=True) if a != b]
    assert changed == [
        ("pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer", "pretrainer: !new:pl_pretrain.Pretrainer")
    ]


@pytest.mark.slow
def test_hyperpyyaml_load_is_identical_to_speechbrains(repo, reference, tmp_path):
    hparams = load_yaml(OUR_PRETRAINER, tmp_path / "ours")
    pretrainer = hparams["pretrainer"]
    assert isinstance(pretrainer, Pretrainer)
    paths = pretrainer.collect_files(default_source=str(repo))
    assert sorted(paths) == sorted(KEYS)
    reports = pretrainer.load_collected()
    assert differences(reference, snapshot(hparams)) == ALL_SAME
    assert reports["model"] is not None and reports["model"].complete
    # InputNormalization's statistics are not in its state_dict: SpeechBrain's own hook loaded them.
    assert snapshot(hparams)["normaliser statistics"]["count"] > 0


@pytest.mark.slow
def test_pretrained_from_hparams_with_our_pretrainer(repo, tmp_path):
    from speechbrain.inference.interfaces import Pretrained

    # The same entry point on both YAMLs. (Compared with each other: from_hparams itself moves the
    # modules, which changes the last bit of a forward output against a direct load.)
    theirs = Pretrained.from_hparams(source=str(repo), savedir=str(tmp_path / "saved_sb"))
    ours = Pretrained.from_hparams(source=str(_our_repo(repo, tmp_path / "ours_repo")), savedir=str(tmp_path / "saved"))
    assert isinstance(ours.hparams.pretrainer, Pretrainer)
    assert differences(snapshot(vars(theirs.hparams)), snapshot(vars(ours.hparams))) == ALL_SAME
    assert sorted(p.name for p in (tmp_path / "saved").iterdir() if p.suffix == ".ckpt") == sorted(
        f"{key}.ckpt" for key in KEYS
    )


@pytest.mark.slow
def test_run_on_main_pattern_on_two_ranks(repo, reference, tmp_path):
    values = assert_all_ok(
        run_ranks(run_on_main_job, 2, args=(OUR_PRETRAINER, str(repo), str(tmp_path / "c")), timeout=240)
    )
    assert [differences(reference, value) for value in values] == [ALL_SAME, ALL_SAME]


@pytest.mark.slow
def test_lightning_fit_on_two_ranks_with_the_yamls_pretrainer(repo, reference, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tests" / "scripts" / "speechbrain_lightning_job.py"),
            "--repo",
            str(repo),
            "--save-folder",
            str(tmp_path / "c"),
            "--out",
            str(tmp_path / "out"),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = [torch.load(tmp_path / "out" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [differences(reference, value) for value in loaded] == [ALL_SAME, ALL_SAME]


# --------------------------------------------------------------------------------------------
# SpeechBrain's fetching types, accepted by value
# --------------------------------------------------------------------------------------------


def test_speechbrain_fetch_types_are_accepted_by_value(tmp_path):
    save(module(1), tmp_path / "src" / "enc.ckpt")
    source = sb_fetching.FetchSource(sb_fetching.FetchFrom.LOCAL, str(tmp_path / "src"))
    out = fetch(
        "enc.ckpt",
        source,
        savedir=tmp_path / "d",
        local_strategy=sb_fetching.LocalStrategy.COPY,
        fetch_config=sb_fetching.FetchConfig(overwrite=True),
    )
    assert out.is_file() and not out.is_symlink()
    target = module(2)
    pt = Pretrainer(
        tmp_path / "c", {"enc": target}, paths={"enc": sb_fetching.FetchSource(source[0], f"{source[1]}/enc.ckpt")}
    )
    pt.collect_files(local_strategy=sb_fetching.LocalStrategy.COPY, fetch_config=sb_fetching.FetchConfig())
    pt.load_collected()
    assert same(target, module(1)) and not (tmp_path / "c" / "enc.ckpt").is_symlink()


def test_speechbrain_fetch_config_without_network_is_offline_here_too(tmp_path):
    with pytest.raises(ValueError, match="allow_network"):
        fetch(
            "f.ckpt",
            "http://127.0.0.1:9/x",
            savedir=tmp_path,
            fetch_config=sb_fetching.FetchConfig(allow_network=False),
        )


def test_a_fetch_config_of_another_type_names_both_classes(tmp_path):
    save(module(1), tmp_path / "src" / "enc.ckpt")
    with pytest.raises(TypeError) as info:
        Pretrainer(tmp_path / "c", {"enc": module(2)}).collect_files(
            str(tmp_path / "src"), fetch_config={"overwrite": True}
        )
    text = str(info.value)
    assert "pl_pretrain" in text and "speechbrain.utils.fetching.FetchConfig" in text and "builtins.dict" in text


# --------------------------------------------------------------------------------------------
# Both collect_files signatures, nothing reinterpreted
# --------------------------------------------------------------------------------------------


def test_collect_files_second_positional_true_is_still_internal_ddp_handling(tmp_path):
    save(module(1), tmp_path / "src" / "enc.ckpt")
    pt = Pretrainer(tmp_path / "c", {"enc": module(2)})
    pt.collect_files(str(tmp_path / "src"), True)
    assert (tmp_path / "c" / "enc.ckpt").is_symlink()


def test_collect_files_speechbrain_strategy_positional_copies(tmp_path):
    save(module(1), tmp_path / "src" / "enc.ckpt")
    pt = Pretrainer(tmp_path / "c", {"enc": module(2)})
    pt.collect_files(str(tmp_path / "src"), sb_fetching.LocalStrategy.COPY, sb_fetching.FetchConfig())
    assert not (tmp_path / "c" / "enc.ckpt").is_symlink()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("copy",), "local_strategy"),
        ((1,), "local_strategy"),
        ((LocalStrategy.COPY, "x"), "fetch_config"),
        ((True, FetchConfig()), "fetch_config"),
    ],
)
def test_collect_files_other_positionals_are_type_errors(tmp_path, args, named):
    pt = Pretrainer(tmp_path / "c", {"enc": module(2)})
    with pytest.raises(TypeError, match=named):
        pt.collect_files(str(tmp_path / "src"), *args)
    assert not (tmp_path / "c").exists()


def test_collect_files_positional_and_keyword_strategy_is_a_type_error(tmp_path):
    pt = Pretrainer(tmp_path / "c", {"enc": module(2)})
    with pytest.raises(TypeError, match="local_strategy"):
        pt.collect_files(str(tmp_path / "src"), LocalStrategy.COPY, local_strategy=LocalStrategy.COPY)


# --------------------------------------------------------------------------------------------
# Hooks: SpeechBrain's honoured in order, ours without SpeechBrain, renamed keys reported
# --------------------------------------------------------------------------------------------


def test_speechbrain_hook_comes_after_custom_hooks_and_before_the_module_transfer(tmp_path):
    from speechbrain.utils.checkpoints import mark_as_transfer, register_checkpoint_hooks

    @register_checkpoint_hooks
    class Stats(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.via = None

        @mark_as_transfer
        def transfer(self, path):
            self.via = "speechbrain hook"

    (tmp_path / "src").mkdir()
    torch.save({}, tmp_path / "src" / "s.ckpt")
    stats = Stats()
    Pretrainer(tmp_path / "c", {"s": stats}).collect_files(str(tmp_path / "src"))
    Pretrainer(tmp_path / "c", {"s": stats}).load_collected()
    assert stats.via == "speechbrain hook"

    def custom(obj, path):
        obj.via = "custom hook"

    Pretrainer(tmp_path / "c", {"s": stats}, custom_hooks={"s": custom}).load_collected()
    assert stats.via == "custom hook"


def test_legacy_keys_are_reported_as_renamed(tmp_path):
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.multihead_attn = torch.nn.Linear(2, 2)

    source = torch.nn.Sequential(Block())
    (tmp_path / "src").mkdir()
    torch.save(
        {k.replace("multihead", "mutihead"): v for k, v in source.state_dict().items()}, tmp_path / "src" / "m.ckpt"
    )
    target = torch.nn.Sequential(Block())
    pt = Pretrainer(tmp_path / "c", {"m": target})
    pt.collect_files(str(tmp_path / "src"))
    report = pt.load_collected()["m"]
    assert same(target, source)
    assert report.renamed == {
        "0.mutihead_attn.weight": "0.multihead_attn.weight",
        "0.mutihead_attn.bias": "0.multihead_attn.bias",
    }
    assert report.complete and report.missing == [] and report.unexpected == []


_WITHOUT_SPEECHBRAIN = """
import pathlib, sys
sys.modules["speechbrain"] = None  # as if it were not installed
import sentencepiece, torch
from pl_pretrain import Pretrainer
src, c = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
tok = sentencepiece.SentencePieceProcessor()
scaler = torch.amp.GradScaler("cpu")
pt = Pretrainer(c, {"tokenizer": tok, "scaler": scaler})
pt.collect_files(str(src))
pt.load_collected()
print(tok.get_piece_size(), scaler.get_scale())
"""


@pytest.mark.slow
def test_builtin_hooks_for_sentencepiece_and_grad_scaler_without_speechbrain(repo, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(repo / "tokenizer.ckpt", src / "tokenizer.ckpt")
    torch.save(torch.amp.GradScaler("cpu", init_scale=256.0).state_dict(), src / "scaler.ckpt")
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_SPEECHBRAIN, str(src), str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import sentencepiece

    expected = sentencepiece.SentencePieceProcessor(model_file=str(repo / "tokenizer.ckpt")).get_piece_size()
    assert result.stdout.split() == [str(expected), "256.0"]


def test_importing_pl_pretrain_does_not_import_speechbrain():
    code = "import sys, pl_pretrain, pl_pretrain.pretrainer; print('speechbrain' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"
