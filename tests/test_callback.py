"""PretrainerCallback in real Trainer runs on CPU: single device and ddp_spawn, in this process.

Each model records its weights' fingerprint on every rank when training starts (before the first
step); the tests compare those with the pretrained file's. The ddp / torchrun / two-node launches
run as subprocesses in test_callback_launchers.py.
"""

from __future__ import annotations

import json
import logging
import warnings

import lightning as L
import pytest
import torch
import yaml
from helpers import ckpt_bytes, digest
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.loggers import CSVLogger
from lightning_models import LateModel, MetaModel, MetaModelWithScale, Model, Nested, encoder

from pl_pretrain import FetchConfig, Pretrainer, PretrainerCallback
from pl_pretrain.callback import load_pretrained
from pl_pretrain.errors import ConfigurationError, FetchError

PRETRAINED_SEED = 7


@pytest.fixture
def records(tmp_path, monkeypatch):
    folder = tmp_path / "records"
    monkeypatch.setenv("PL_PRETRAIN_RECORD_DIR", str(folder))

    def read(tag: str, event: str, world: int = 1) -> list[dict]:
        return [json.loads((folder / f"{tag}-{event}-rank{r}.json").read_text()) for r in range(world)]

    return read


@pytest.fixture
def pretrained(tmp_path):
    """A folder holding encoder.ckpt; returns (folder, the encoder's fingerprint)."""
    folder = tmp_path / "pretrained"
    folder.mkdir()
    enc = encoder(seed=PRETRAINED_SEED)
    (folder / "encoder.ckpt").write_bytes(ckpt_bytes(enc))
    return folder, digest(enc)


def trainer(tmp_path, callbacks, **kwargs):
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path / "root"),
    )
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def test_single_device_loads_before_the_first_step(tmp_path, pretrained, records, caplog):
    folder, expected = pretrained
    cb = PretrainerCallback(collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(folder))
    model = Model()
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, [cb]).fit(model)
    assert records("run", "train_start")[0]["encoder"] == expected
    assert records("run", "train_end")[0]["encoder"] != expected  # and then it trained
    assert cb.reports["encoder"].complete
    assert "loaded pretrained parameters" in caplog.text and "encoder" in caplog.text


def test_objects_and_nested_attribute_paths(tmp_path, pretrained, records):
    folder, expected = pretrained
    model = Nested()
    cb = PretrainerCallback(
        collect_in=tmp_path / "c", loadables={"encoder": "model.backbone"}, default_source=str(folder)
    )
    trainer(tmp_path, [cb]).fit(model)
    assert records("run", "train_start")[0]["encoder"] == expected

    model2 = Model(tag="objects")
    cb2 = PretrainerCallback(
        collect_in=tmp_path / "c2", loadables={"encoder": model2.encoder}, default_source=str(folder)
    )
    trainer(tmp_path, [cb2]).fit(model2)
    assert records("objects", "train_start")[0]["encoder"] == expected


def test_a_ready_pretrainer(tmp_path, pretrained, records):
    folder, expected = pretrained
    pt = Pretrainer(tmp_path / "c", {"encoder": "encoder"}, paths={"encoder": str(folder / "encoder.ckpt")})
    trainer(tmp_path, [PretrainerCallback(pt)]).fit(Model())
    assert records("run", "train_start")[0]["encoder"] == expected


def test_layers_built_in_configure_model_get_their_weights(tmp_path, pretrained, records):
    folder, expected = pretrained
    model = LateModel()
    cb = PretrainerCallback(collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(folder))
    trainer(tmp_path, [cb]).fit(model)
    assert records("run", "train_start")[0]["encoder"] == expected
    assert "configure_model" not in vars(model)  # the wrapper removed itself


def test_layers_built_on_meta_get_the_file_and_a_new_head_its_own_init_once(tmp_path, pretrained, records):
    folder, expected = pretrained
    cb = PretrainerCallback(collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(folder))
    trainer(tmp_path, [cb]).fit(MetaModel())
    start = records("run", "train_start")[0]
    assert start["encoder"] == expected
    assert start["head_finite"] and start["head_inits"] == 1  # reset_parameters() on real memory, once


def test_a_module_on_meta_without_reset_parameters_is_named_in_a_warning(tmp_path, pretrained):
    folder, _ = pretrained
    cb = PretrainerCallback(collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(folder))
    with pytest.warns(UserWarning, match="Scale had tensors on the meta device and no reset_parameters"):
        trainer(tmp_path, [cb]).fit(MetaModelWithScale())


def test_missing_attribute_lists_what_exists(tmp_path, pretrained):
    folder, _ = pretrained
    cb = PretrainerCallback(
        collect_in=tmp_path / "c", loadables={"encoder": "model.decodr"}, default_source=str(folder)
    )
    with pytest.raises(ConfigurationError, match="Nested has no attribute 'model.decodr'") as info:
        trainer(tmp_path, [cb]).fit(Nested())
    assert "backbone" in str(info.value) and info.value.key == "encoder"


def test_resume_keeps_the_resumed_weights_and_fetches_nothing(tmp_path, http_server, records):
    http_server.add("m/encoder.ckpt", ckpt_bytes(encoder(seed=PRETRAINED_SEED)))
    source = f"{http_server.url}/m"
    cb = PretrainerCallback(collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=source)
    first = trainer(tmp_path, [cb], max_steps=4)
    model = Model(tag="first")
    first.fit(model)
    first.save_checkpoint(tmp_path / "last.ckpt")
    fine_tuned = digest(model.encoder)
    http_server.reset_log()

    # trainer.fit(model, ckpt_path=...): Lightning's restore runs after setup and wins.
    cb2 = PretrainerCallback(collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=source)
    second = trainer(tmp_path, [cb2], max_steps=6)
    second.fit(Model(tag="resumed"), ckpt_path=tmp_path / "last.ckpt")
    assert records("resumed", "train_start")[0]["encoder"] == fine_tuned
    assert cb2.resumed_from == str(tmp_path / "last.ckpt")
    assert cb2.provenance["encoder"]["location"] == f"{source}/encoder.ckpt"  # carried over from the checkpoint
    http_server.reset_log()

    # trainer.ckpt_path = ... before the run (Lightning's public setter): nothing is fetched, even into a new folder.
    cb3 = PretrainerCallback(collect_in=tmp_path / "c3", loadables={"encoder": "encoder"}, default_source=source)
    third = trainer(tmp_path, [cb3], max_steps=6)
    third.ckpt_path = str(tmp_path / "last.ckpt")
    third.fit(Model(tag="quiet"))
    assert records("quiet", "train_start")[0]["encoder"] == fine_tuned
    assert http_server.requests == []
    assert cb3.resumed_from == str(tmp_path / "last.ckpt")


def test_fit_from_a_checkpoint_then_test_of_a_fresh_model_loads_it(tmp_path, pretrained, records):
    folder, expected = pretrained
    cb = PretrainerCallback(collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(folder))
    first = trainer(tmp_path, [cb])
    first.fit(Model(tag="first"))
    first.save_checkpoint(tmp_path / "last.ckpt")

    cb2 = PretrainerCallback(collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(folder))
    t = trainer(tmp_path, [cb2], max_steps=5)
    t.fit(Model(tag="resumed"), ckpt_path=tmp_path / "last.ckpt")
    # trainer.ckpt_path still names last.ckpt here; the fresh model is not a resume and gets the file.
    t.test(Model(tag="fresh"))
    assert records("fresh", "test_start")[0]["encoder"] == expected


def test_resume_warns_when_sources_changed(tmp_path, pretrained):
    folder, _ = pretrained
    cb = PretrainerCallback(collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(folder))
    first = trainer(tmp_path, [cb])
    first.fit(Model())
    first.save_checkpoint(tmp_path / "last.ckpt")
    other = tmp_path / "other"
    other.mkdir()
    (other / "encoder.ckpt").write_bytes((folder / "encoder.ckpt").read_bytes())
    cb2 = PretrainerCallback(collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(other))
    with pytest.warns(UserWarning, match="initialised from other pretrained sources"):
        trainer(tmp_path, [cb2], max_steps=5).fit(Model(), ckpt_path=tmp_path / "last.ckpt")


def test_checkpoint_records_where_the_weights_came_from(tmp_path, hub):
    commit = hub.add_file("org/asr", "encoder.ckpt", ckpt_bytes(encoder(seed=PRETRAINED_SEED)))
    cb = PretrainerCallback(
        collect_in=tmp_path / "c",
        loadables={"encoder": "encoder"},
        paths={"encoder": "org/asr/encoder.ckpt"},
        fetch_config=FetchConfig(revision="main", token="hf_should_not_be_recorded"),
    )
    t = trainer(tmp_path, [cb])
    t.fit(Model())
    t.save_checkpoint(tmp_path / "out.ckpt")
    saved = torch.load(tmp_path / "out.ckpt", weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("PretrainerCallback")]
    entry = state["provenance"]["encoder"]
    assert entry["source"] == "org/asr" and entry["commit"] == commit and entry["revision"] == "main"
    assert len(entry["sha256"]) == 64 and entry["report"]["missing"] == []
    assert "hf_should_not_be_recorded" not in repr(saved["callbacks"])


def test_fit_then_test_keeps_the_fine_tuned_weights(tmp_path, pretrained, records):
    folder, expected = pretrained
    cb = PretrainerCallback(collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(folder))
    t = trainer(tmp_path, [cb])
    model = Model()
    t.fit(model)
    fine_tuned = records("run", "train_end")[0]["encoder"]
    t.test(model)
    assert records("run", "test_start")[0]["encoder"] == fine_tuned != expected


def test_test_alone_loads_and_stages_can_forbid_it(tmp_path, pretrained, records):
    folder, expected = pretrained
    cb = PretrainerCallback(collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(folder))
    trainer(tmp_path, [cb]).test(Model(tag="evaluate"))
    assert records("evaluate", "test_start")[0]["encoder"] == expected

    only_fit = PretrainerCallback(
        collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(folder), stages=["fit"]
    )
    trainer(tmp_path, [only_fit]).test(Model(tag="untouched"))
    assert records("untouched", "test_start")[0]["encoder"] == digest(Model().encoder)


def test_freeze_keeps_the_pretrained_weights(tmp_path, pretrained, records):
    folder, expected = pretrained
    cb = PretrainerCallback(
        collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(folder), freeze=["encoder"]
    )
    model = Model()
    head_before = digest(model.head)
    trainer(tmp_path, [cb]).fit(model)
    end = records("run", "train_end")[0]
    assert end["encoder"] == expected and not any(end["encoder_requires_grad"])
    assert end["head"] != head_before


class UnfreezeAtEpoch1(BaseFinetuning):
    def freeze_before_training(self, pl_module):
        pass  # PretrainerCallback froze the encoder already

    def finetune_function(self, pl_module, current_epoch, optimizer):
        if current_epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.encoder, optimizer, lr=0.1)


def test_freeze_plays_well_with_base_finetuning(tmp_path, pretrained, records):
    folder, expected = pretrained
    cb = PretrainerCallback(
        collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(folder), freeze=True
    )
    model = Model()
    trainer(tmp_path, [cb, UnfreezeAtEpoch1()], max_steps=-1, max_epochs=2).fit(model)
    end = records("run", "train_end")[0]
    assert all(end["encoder_requires_grad"]) and end["encoder"] != expected


def test_freeze_survives_a_resume(tmp_path, pretrained, records):
    folder, expected = pretrained
    make = lambda: PretrainerCallback(  # noqa: E731
        collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(folder), freeze=["encoder"]
    )
    t = trainer(tmp_path, [make()])
    t.fit(Model())
    t.save_checkpoint(tmp_path / "last.ckpt")
    trainer(tmp_path, [make()], max_steps=6).fit(Model(tag="resumed"), ckpt_path=tmp_path / "last.ckpt")
    end = records("resumed", "train_end")[0]
    assert end["encoder"] == expected and not any(end["encoder_requires_grad"])


def test_freeze_leaves_batch_norm_trainable_unless_freeze_bn(tmp_path):
    for freeze_bn in (False, True):
        model = Model(tag=f"bn{freeze_bn}")
        model.encoder.append(torch.nn.BatchNorm1d(8))  # a pretrained body with a batch norm
        torch.save(model.encoder.state_dict(), tmp_path / f"bn{freeze_bn}.ckpt")
        cb = PretrainerCallback(
            collect_in=None,
            loadables={"encoder": "encoder"},
            paths={"encoder": str(tmp_path / f"bn{freeze_bn}.ckpt")},
            freeze=True,
            freeze_bn=freeze_bn,
        )
        stats = model.encoder[3].running_mean.clone()
        trainer(tmp_path, [cb]).fit(model)
        bn = model.encoder[3]
        linear = model.encoder[0]
        assert not linear.weight.requires_grad
        assert bn.weight.requires_grad is (not freeze_bn) and bn.bias.requires_grad is (not freeze_bn)
        assert torch.equal(bn.running_mean, stats) is freeze_bn  # running statistics kept only when frozen


def test_report_goes_to_the_loggers(tmp_path, pretrained):
    folder, _ = pretrained
    cb = PretrainerCallback(collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(folder))
    logger = CSVLogger(tmp_path / "logs", name="run")
    trainer(tmp_path, [cb], logger=logger).fit(Model())
    hparams = yaml.safe_load((tmp_path / "logs" / "run" / "version_0" / "hparams.yaml").read_text())
    assert hparams["pretrained/encoder/loaded"] == 4
    assert hparams["pretrained/encoder/missing"] == 0
    assert hparams["pretrained/encoder/location"].endswith("encoder.ckpt")


def test_incomplete_load_warns_once(tmp_path):
    folder = tmp_path / "pretrained"
    folder.mkdir()
    partial = {k: v for k, v in encoder(seed=1).state_dict().items() if k.startswith("0.")}
    torch.save(partial, folder / "encoder.ckpt")
    cb = PretrainerCallback(collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(folder))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb]).fit(Model())
    ours = [w for w in caught if "did not load completely" in str(w.message)]
    assert len(ours) == 1 and "encoder" in str(ours[0].message)
    assert cb.reports["encoder"].missing == ["2.weight", "2.bias"]


def test_fetch_failure_stops_fit_with_the_key(tmp_path, http_server):
    cb = PretrainerCallback(
        collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=f"{http_server.url}/nothing"
    )
    with pytest.raises(FetchError, match="HTTP 404") as info:
        trainer(tmp_path, [cb]).fit(Model())
    assert info.value.key == "encoder" and f"{http_server.url}/nothing" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(pretrainer=Pretrainer(loadables={"a": torch.nn.Linear(1, 1)}), loadables={"a": "a"}),
            "got a Pretrainer and also loadables",
        ),
        (dict(), "has nothing to load"),
        (dict(loadables={"encoder": "encoder"}, stages=["train"]), "stages=\\['train'\\] must be a list drawn from"),
        (dict(loadables={"encoder": "encoder"}, stages="fit"), "must be a list drawn from"),
        (dict(loadables={"encoder": "encoder"}, freeze=["decoder"]), "freeze=\\['decoder'\\] names \\['decoder'\\]"),
        (dict(loadables={"encoder": "encoder"}, local_strategy="COPY"), "is not a LocalStrategy"),
        (dict(loadables={"encoder": "encoder"}, fetch_config={"revision": "x"}), "not a FetchConfig"),
        (dict(loadables={"encoder": "encoder"}, collect_per_node="sometimes"), "must be True, False or 'auto'"),
        (dict(pretrainer="not a pretrainer"), "not a pl_pretrain.Pretrainer"),
    ],
)
def test_misuse_fails_early_with_one_sentence(kwargs, message):
    pretrainer = kwargs.pop("pretrainer", None)
    with pytest.raises(ConfigurationError, match=message):
        PretrainerCallback(pretrainer, **kwargs)


def test_two_callbacks_keep_separate_state(tmp_path, pretrained):
    folder, _ = pretrained
    a = PretrainerCallback(collect_in=tmp_path / "a", loadables={"encoder": "encoder"}, default_source=str(folder))
    b = PretrainerCallback(
        collect_in=tmp_path / "b",
        loadables={"head": "head"},
        paths={"head": str(folder / "encoder.ckpt")},
        transfer_options={"head": {"strict": False}},
    )
    assert a.state_key != b.state_key


# ------------------------------------------------------------------------------------------
# ddp_spawn, in this process
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_spawn_two_ranks(tmp_path, http_server, records):
    http_server.add("m/encoder.ckpt", ckpt_bytes(encoder(seed=PRETRAINED_SEED)))
    expected = digest(encoder(seed=PRETRAINED_SEED))
    cb = PretrainerCallback(
        collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=f"{http_server.url}/m"
    )
    t = trainer(tmp_path, [cb], strategy="ddp_spawn", devices=2)
    model = Model(tag="spawn")
    t.fit(model)
    starts = records("spawn", "train_start", world=2)
    assert [s["encoder"] for s in starts] == [expected, expected]
    assert all(s["world_size"] == 2 for s in starts)
    assert len(http_server.gets("/m/encoder.ckpt")) == 1
    fine_tuned = digest(model.encoder)  # the main process got rank 0's trained weights back
    assert fine_tuned != expected
    t.test(model)
    assert [s["encoder"] for s in records("spawn", "test_start", world=2)] == [fine_tuned, fine_tuned]


@pytest.mark.slow
def test_ddp_spawn_test_of_a_fresh_model_after_fit_loads_it(tmp_path, pretrained, records):
    # The workers of each run start from the main process's copy: a fresh model is not the fine-tuned one.
    folder, expected = pretrained
    cb = PretrainerCallback(collect_in=tmp_path / "c", loadables={"encoder": "encoder"}, default_source=str(folder))
    t = trainer(tmp_path, [cb], strategy="ddp_spawn", devices=2)
    t.fit(Model(tag="spawn-fit"))
    t.test(Model(tag="spawn-fresh"))
    assert [s["encoder"] for s in records("spawn-fresh", "test_start", world=2)] == [expected, expected]


def test_fabric_load_pretrained(tmp_path, pretrained):
    folder, expected = pretrained
    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    model = Model()
    pt = Pretrainer(tmp_path / "c", {"encoder": model.encoder})
    reports = load_pretrained(fabric, pt, default_source=str(folder))
    assert reports["encoder"].complete and digest(model.encoder) == expected
    fabric.setup(model)
