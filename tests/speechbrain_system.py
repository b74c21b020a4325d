"""A small SpeechBrain system, trained and saved the SpeechBrain way, and its inference YAMLs.

`publish(folder)` trains a few steps of a model built from SpeechBrain's own classes (an SB
``Linear``/``BatchNorm1d`` model behind an ``InputNormalization``, a ``CategoricalEncoder`` for
the labels, a SentencePiece tokenizer trained on a tiny text), saves it with SpeechBrain's own
``Checkpointer``, and lays it out as a SpeechBrain model repository: ``<key>.ckpt`` files and a
``hyperparams.yaml``. `inference_yaml(tag)` is that YAML with the Pretrainer's tag swapped: the
one line a SpeechBrain user changes. `snapshot(hparams)` is everything a loaded system holds,
for comparing SpeechBrain's load with ours.

SpeechBrain imports torchaudio when it is imported; `use_torchaudio_stand_in()` puts the
import-only stand-in from tests/stubs/ first on ``sys.path`` when the real one does not load
(it cannot be installed beside torch 2.13.0). Nothing here, nor in SpeechBrain's code that the
tests call (checkpoints, fetching, parameter transfer, the inference interface), reads audio.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import shutil
import sys
from typing import Any

STUBS = pathlib.Path(__file__).resolve().parent / "stubs"

SB_PRETRAINER = "speechbrain.utils.parameter_transfer.Pretrainer"
OUR_PRETRAINER = "pl_pretrain.Pretrainer"
KEYS = ("model", "normalizer", "label_encoder", "tokenizer")
LABELS = ("yes", "no", "maybe")
TEXT = "the quick brown fox jumps over the lazy dog\nspeech brain lightning pretrained parameters\n" * 20
SENTENCE = "the lazy fox jumps over brown parameters"


def use_torchaudio_stand_in() -> None:
    """Makes ``import torchaudio`` succeed: the real one if it loads, else tests/stubs/torchaudio."""
    try:
        import torchaudio  # noqa: F401
    except Exception:  # not installed, or installed for another torch (its native library fails to load)
        for name in [n for n in sys.modules if n == "torchaudio" or n.startswith("torchaudio.")]:
            del sys.modules[name]
        if str(STUBS) not in sys.path:
            sys.path.insert(0, str(STUBS))
        # Subprocesses (Lightning's ddp re-executes the script) must find it too.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(STUBS), os.environ.get("PYTHONPATH", "")]))
        importlib.invalidate_caches()


def inference_yaml(tag: str = SB_PRETRAINER) -> str:
    """Returns a SpeechBrain inference ``hyperparams.yaml`` whose Pretrainer is ``!new:<tag>``."""
    return f"""\
# A SpeechBrain inference YAML: modules, a label encoder, a tokenizer and the pretrainer.
save_folder: pretrained_models
n_features: 4
n_hidden: 8

model: !new:torch.nn.Sequential
    - !new:speechbrain.nnet.linear.Linear
        input_size: !ref <n_features>
        n_neurons: !ref <n_hidden>
    - !new:speechbrain.nnet.normalization.BatchNorm1d
        input_size: !ref <n_hidden>
    - !new:torch.nn.LeakyReLU
    - !new:speechbrain.nnet.linear.Linear
        input_size: !ref <n_hidden>
        n_neurons: {len(LABELS)}

normalizer: !new:speechbrain.processing.features.InputNormalization
    norm_type: global

label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder

tokenizer: !new:sentencepiece.SentencePieceProcessor

modules:
    model: !ref <model>
    normalizer: !ref <normalizer>

pretrainer: !new:{tag}
    collect_in: !ref <save_folder>
    loadables:
        model: !ref <model>
        normalizer: !ref <normalizer>
        label_encoder: !ref <label_encoder>
        tokenizer: !ref <tokenizer>
"""


def load_yaml(tag: str, save_folder: os.PathLike | str) -> dict[str, Any]:
    """Returns the hparams of `inference_yaml(tag)` loaded by HyperPyYAML, collecting into `save_folder`."""
    from hyperpyyaml import load_hyperpyyaml

    return load_hyperpyyaml(inference_yaml(tag), overrides={"save_folder": str(save_folder)})


def batch(seed: int = 0, n: int = 6, frames: int = 5):
    """Returns (features, relative lengths, label indices) of a deterministic toy batch."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, frames, 4, generator=g) * 3 + 1
    lengths = torch.ones(n)
    labels = torch.randint(0, len(LABELS), (n,), generator=g)
    return x, lengths, labels


def publish(folder: pathlib.Path, *, steps: int = 5) -> pathlib.Path:
    """Returns a SpeechBrain model repository in `folder`: trained, saved by SB's Checkpointer.

    The repository holds ``model.ckpt``, ``normalizer.ckpt``, ``label_encoder.ckpt``,
    ``tokenizer.ckpt`` and ``hyperparams.yaml`` (with SpeechBrain's own Pretrainer tag).
    """
    import sentencepiece
    import torch
    from speechbrain.utils.checkpoints import Checkpointer

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    hparams = load_yaml(SB_PRETRAINER, folder / "unused")
    model, normalizer, encoder = hparams["model"], hparams["normalizer"], hparams["label_encoder"]
    encoder.update_from_iterable(LABELS)

    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    normalizer.train()
    for step in range(steps):
        x, lengths, labels = batch(seed=step)
        logits = model(normalizer(x, lengths)).mean(dim=1)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    checkpointer = Checkpointer(
        folder / "checkpoints", {"model": model, "normalizer": normalizer, "label_encoder": encoder}
    )
    ckpt = checkpointer.save_checkpoint()
    for key in ("model", "normalizer", "label_encoder"):
        shutil.copyfile(ckpt.path / f"{key}.ckpt", folder / f"{key}.ckpt")

    (folder / "text.txt").write_text(TEXT)
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "text.txt"),
        model_prefix=str(folder / "tok"),
        vocab_size=30,
        model_type="unigram",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    shutil.copyfile(folder / "tok.model", folder / "tokenizer.ckpt")
    (folder / "hyperparams.yaml").write_text(inference_yaml(SB_PRETRAINER))
    return folder


def snapshot(hparams: dict[str, Any]) -> dict[str, Any]:
    """Returns everything a loaded system holds: tensors, statistics, label map, vocabulary, outputs."""
    import torch

    model, normalizer = hparams["model"], hparams["normalizer"]
    encoder, tokenizer = hparams["label_encoder"], hparams["tokenizer"]
    modes = model.training, normalizer.training
    model.eval()
    normalizer.eval()
    x, lengths, _ = batch(seed=99)
    with torch.no_grad():
        outputs = model(normalizer(x, lengths))
    model.train(modes[0])
    normalizer.train(modes[1])
    return {
        "model tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "normaliser statistics": {
            "count": int(normalizer.count),
            "glob_mean": normalizer.glob_mean.clone(),
            "glob_std": normalizer.glob_std.clone(),
        },
        "label map": dict(encoder.lab2ind),
        "vocabulary": [tokenizer.id_to_piece(i) for i in range(tokenizer.get_piece_size())]
        + [tokenizer.encode_as_pieces(SENTENCE)],
        "forward outputs": outputs,
    }


def differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, bool]:
    """Returns object name -> True when `a` and `b` hold exactly the same values for it."""
    import torch

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, list):
            return isinstance(y, list) and len(x) == len(y) and all(same(i, j) for i, j in zip(x, y, strict=True))
        return x == y

    return {name: same(a[name], b[name]) for name in a}


def run_on_main_job(rank: int, tag: str, repo: str, save_folder: str) -> dict[str, Any]:
    """One rank of SpeechBrain's pattern: ``run_on_main(pretrainer.collect_files)``, then every rank loads.

    Returns this rank's `snapshot` of the loaded system (run by tests/dist.py on gloo ranks).
    """
    use_torchaudio_stand_in()
    from speechbrain.utils.distributed import run_on_main

    hparams = load_yaml(tag, save_folder)
    pretrainer = hparams["pretrainer"]
    run_on_main(pretrainer.collect_files, kwargs={"default_source": repo})
    pretrainer.load_collected()
    return snapshot(hparams)
