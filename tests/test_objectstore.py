"""Pretrained weights kept in an object store: ``s3://``, ``gs://`` and ``az://`` sources.

Each story runs against a real server on 127.0.0.1 (moto's S3, gcp-storage-emulator, Azurite; see
tests/objectstores.py), reached through each ecosystem's standard environment, behind a proxy that
counts what the client asked for. Faults, credentials and secrets are in
test_faults_objectstore.py; distributed runs in test_distributed.py and test_launchers.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ckpt_bytes, digest, module

from pl_pretrain import FetchConfig, FetchFrom, LocalStrategy, Pretrainer, fetch, guess_source
from pl_pretrain.errors import ChecksumError, ConfigurationError, OfflineError
from pl_pretrain.fetching import RECORD_DIR, fetch_file

# Real servers, one of them (Azurite) in another process.
pytestmark = pytest.mark.slow

KEY = "encoder"


def collect(collect_in, path, *, strategy=LocalStrategy.SYMLINK, checksum=None, **config):
    """Collects and loads the encoder from `path`; returns (its fingerprint, the pretrainer)."""
    encoder = module(seed=99)
    pt = Pretrainer(collect_in, {KEY: encoder}, paths={KEY: path}, checksums={KEY: checksum} if checksum else None)
    pt.collect_files(local_strategy=strategy, fetch_config=FetchConfig(**config))
    pt.load_collected()
    return digest(encoder), pt


def publish(store, name: str, seed: int = 1) -> tuple[str, str, bytes]:
    """Uploads a checkpoint as `name`; returns (its address, the fingerprint it loads, its bytes)."""
    data = ckpt_bytes(module(seed=seed))
    return store.put(name, data), digest(module(seed=seed)), data


def test_schemes_are_object_store_uris():
    for url in ["s3://models/asr", "gs://models/asr", "az://models/asr", "abfs://models/asr", "S3://Models/x"]:
        assert guess_source(url) == (FetchFrom.URI, url)


@pytest.mark.parametrize("strategy", list(LocalStrategy))
def test_collect_from_each_store_with_every_strategy(tmp_path, store, strategy):
    url, expected, _ = publish(store, f"strategy/{strategy.name}/encoder.ckpt")
    loaded, pt = collect(tmp_path / "c", url, strategy=strategy)
    assert loaded == expected
    assert store.body_gets(f"strategy/{strategy.name}/encoder.ckpt") == 1
    path = pt.collected[KEY].path
    placed = tmp_path / "c" / "encoder.ckpt"
    if strategy is LocalStrategy.NO_LINK:
        assert not placed.exists() and str(path).startswith(os.environ["PL_PRETRAIN_CACHE"])
    else:
        assert path == placed and placed.is_file()
        assert placed.is_symlink() == (strategy is LocalStrategy.SYMLINK)  # a link leads to the cached copy
    shown = pt.provenance()[KEY]
    assert shown["location"] == url and shown["fetch_from"] == "URI"
    assert shown["etag"]  # the object's identity is recorded...
    if store.scheme == "gs":
        assert shown["commit"]  # ...with GCS's generation


def test_an_unchanged_object_is_not_read_again(tmp_path, store):
    url, expected, _ = publish(store, "reuse/encoder.ckpt")
    collect(tmp_path / "c", url, strategy=LocalStrategy.COPY)
    assert store.body_gets("reuse/encoder.ckpt") == 1
    store.proxy.reset()
    loaded, pt = collect(tmp_path / "c", url, strategy=LocalStrategy.COPY)
    assert loaded == expected and pt.collected[KEY].reused
    assert store.body_gets("reuse/encoder.ckpt") == 0  # a metadata request only
    assert store.requests_for("reuse/encoder.ckpt") >= 1

    store.proxy.reset()
    loaded, _ = collect(tmp_path / "c", url, strategy=LocalStrategy.COPY, allow_network=False)
    assert loaded == expected
    assert store.proxy.count() == 0  # offline: not even a metadata request


def test_a_changed_object_is_fetched_again(tmp_path, store):
    url, _, _ = publish(store, "changed/encoder.ckpt", seed=1)
    first, pt = collect(tmp_path / "c", url)
    etag = pt.provenance()[KEY]["etag"]
    url, expected, _ = publish(store, "changed/encoder.ckpt", seed=2)
    store.proxy.reset()
    second, pt = collect(tmp_path / "c", url)
    assert second == expected != first
    assert store.body_gets("changed/encoder.ckpt") == 1
    assert pt.provenance()[KEY]["etag"] != etag


def test_s3_version_id_is_recorded_and_a_new_version_fetched(tmp_path, s3):
    s3.upload("asr/encoder.ckpt", ckpt_bytes(module(seed=1)), bucket="versioned")
    url = s3.url("asr/encoder.ckpt", bucket="versioned")
    _, pt = collect(tmp_path / "c", url)
    first = pt.provenance()[KEY]["commit"]
    assert first  # the version id
    s3.upload("asr/encoder.ckpt", ckpt_bytes(module(seed=2)), bucket="versioned")
    loaded, pt = collect(tmp_path / "c", url)
    assert loaded == digest(module(seed=2))
    assert pt.provenance()[KEY]["commit"] not in (None, first)
    record = json.loads((tmp_path / "c" / RECORD_DIR / "encoder.ckpt.json").read_text())
    assert record["commit"] == pt.provenance()[KEY]["commit"] and record["etag"]


def test_offline_without_a_copy_makes_no_request(tmp_path, s3):
    url, _, _ = publish(s3, "offline/encoder.ckpt")
    with pytest.raises(OfflineError, match="network is off"):
        collect(tmp_path / "c", url, allow_network=False)
    assert s3.proxy.count() == 0


def test_without_collect_in_the_cache_is_keyed_by_bucket_and_key(tmp_path, s3):
    url, expected, _ = publish(s3, "nocollect/asr/encoder.ckpt")
    loaded, pt = collect(None, url)
    path = pt.collected[KEY].path
    cache = os.environ["PL_PRETRAIN_CACHE"]
    assert loaded == expected
    assert str(path) == os.path.join(cache, "objects", "s3", "models", "nocollect", "asr", "encoder.ckpt")
    s3.proxy.reset()
    assert collect(None, url)[0] == expected
    assert s3.body_gets("nocollect/asr/encoder.ckpt") == 0
    # fetch() with no savedir returns the same cached copy
    assert fetch("encoder.ckpt", s3.url("nocollect/asr")) == path


@pytest.mark.parametrize("collect_in", ["folder", None])
@pytest.mark.parametrize("strategy", [LocalStrategy.SYMLINK, LocalStrategy.COPY_SKIP_CACHE, LocalStrategy.NO_LINK])
def test_a_sharded_checkpoint_under_one_prefix(tmp_path, s3, strategy, collect_in):
    import huggingface_hub

    source = module(seed=5)
    (tmp_path / "src").mkdir()
    huggingface_hub.save_torch_state_dict(source.state_dict(), tmp_path / "src", max_shard_size=200)
    files = sorted(p.name for p in (tmp_path / "src").iterdir())
    assert len(files) > 2  # an index and at least two shards
    for name in files:
        s3.upload(f"sharded-{strategy.name}-{collect_in}/{name}", (tmp_path / "src" / name).read_bytes())
    target = module(seed=6)
    pt = Pretrainer(
        None if collect_in is None else tmp_path / "c",
        {"model": target},
        {"model": s3.url(f"sharded-{strategy.name}-{collect_in}/model.safetensors.index.json")},
    )
    pt.collect_files(local_strategy=strategy)
    report = pt.load_collected()["model"]
    assert report.complete and digest(target) == digest(source)
    for name in files:
        assert s3.body_gets(f"sharded-{strategy.name}-{collect_in}/{name}") == 1


def test_a_pinned_checksum_is_verified(tmp_path, s3):
    import hashlib

    url, expected, data = publish(s3, "pinned/encoder.ckpt")
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    assert collect(tmp_path / "good", url, checksum=good)[0] == expected
    with pytest.raises(ChecksumError, match="was expected; the file was removed"):
        collect(tmp_path / "bad", url, checksum="sha256:" + "0" * 64)
    assert not (tmp_path / "bad" / "encoder.ckpt").exists()
    # The cached copy the link led to went too: the next run reads the object again.
    s3.proxy.reset()
    assert collect(tmp_path / "again", url, checksum=good)[0] == expected
    assert s3.body_gets("pinned/encoder.ckpt") == 1


def test_storage_options_reach_the_backend_and_stay_out_of_repr(tmp_path, s3, monkeypatch):
    url, expected, _ = publish(s3, "options/encoder.ckpt")
    access, secret = s3.extra["access"], s3.extra["secret"]
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    options = {"endpoint_url": s3.proxy.url, "key": access, "secret": secret}
    assert collect(tmp_path / "c", url, storage_options=options)[0] == expected
    assert s3.body_gets("options/encoder.ckpt") == 1
    assert secret not in repr(FetchConfig(storage_options=options))


def test_a_missing_extra_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # what `import s3fs` does when it is not installed
    with pytest.raises(ConfigurationError, match=r"pip install 'pl-pretrain\[s3\]'") as info:
        collect(tmp_path / "c", "s3://models/asr/encoder.ckpt")
    assert info.value.key == KEY and "s3fs" in str(info.value)
    assert not (tmp_path / "c" / "encoder.ckpt").exists()


def test_import_pl_pretrain_imports_no_object_store_backend():
    code = (
        "import sys, pl_pretrain, pl_pretrain.fetching\n"
        "pl_pretrain.guess_source('s3://models/x')\n"
        "print([m for m in ('s3fs', 'gcsfs', 'adlfs', 'boto3', 'botocore', 'aiobotocore', 'azure') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_fetch_file_reports_the_object(tmp_path, gcs):
    url, _, data = publish(gcs, "direct/asr/encoder.ckpt")
    fetched = fetch_file("asr/encoder.ckpt", gcs.url("direct"), tmp_path / "c", local_strategy=LocalStrategy.COPY)
    assert fetched.path.read_bytes() == data
    assert fetched.location == url and fetched.size == len(data) and fetched.commit and fetched.etag
