"""fetch(): every source kind with every LocalStrategy, and SpeechBrain's known bugs left behind.

Ports SpeechBrain's tests/unittests/test_fetch.py, then goes past it: URLs against a loopback
server, the Hub through the real huggingface_hub client against a loopback Hub, revisions and
tokens asserted on the server side, and each bad input's error text.
"""

from __future__ import annotations

import os
import pathlib
import threading
import time

import pytest
from helpers import ckpt_bytes, module
from servers import Fault

from pl_pretrain import FetchConfig, FetchFrom, FetchSource, LocalStrategy, PretrainerError, fetch, guess_source
from pl_pretrain.errors import ConfigurationError, FetchError, OfflineError
from pl_pretrain.fetching import RECORD_DIR, fetch_file

ALL = list(LocalStrategy)


# ------------------------------------------------------------------------------------------
# guess_source (SpeechBrain's test_guess_source_local_and_uri, and more)
# ------------------------------------------------------------------------------------------


def test_guess_source_kinds(tmp_path):
    assert guess_source(str(tmp_path)) == (FetchFrom.LOCAL, str(tmp_path))
    assert guess_source(tmp_path) == (FetchFrom.LOCAL, str(tmp_path))
    assert guess_source("http://example.com/models")[0] is FetchFrom.URI
    assert guess_source("https://example.com")[0] is FetchFrom.URI
    assert guess_source("facebook/wav2vec2-base-960h") == (FetchFrom.HUGGING_FACE, "facebook/wav2vec2-base-960h")
    pinned = FetchSource(FetchFrom.HUGGING_FACE, str(tmp_path))
    assert guess_source(pinned) == (FetchFrom.HUGGING_FACE, str(tmp_path))


@pytest.mark.parametrize("source", ["file:///etc", "hdfs://cluster/models", "ftp://host/x"])
def test_other_url_schemes_are_rejected(source):
    with pytest.raises(ConfigurationError, match="Only http:// and https://") as info:
        guess_source(source)
    assert isinstance(info.value, ValueError)
    assert source in str(info.value)


def test_nonexistent_folder_is_not_sent_to_the_hub(tmp_path, hub):
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(FetchError, match="No such local folder .* not a Hugging Face Hub repo id") as info:
        fetch("model.ckpt", str(missing), tmp_path / "out")
    assert str(missing) in str(info.value)
    assert hub.requests == []


# ------------------------------------------------------------------------------------------
# Local sources (SpeechBrain's link_with_strategy and fetch_local_file tests)
# ------------------------------------------------------------------------------------------


@pytest.fixture
def local_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.ckpt").write_bytes(b"weights-v1")
    return src


@pytest.mark.parametrize("strategy", ALL)
def test_local_every_strategy(local_source, tmp_path, strategy):
    dest = tmp_path / "dest"
    path = fetch("model.ckpt", local_source, dest, "enc.ckpt", local_strategy=strategy)
    assert path.read_bytes() == b"weights-v1"
    if strategy is LocalStrategy.NO_LINK:
        assert path == local_source / "model.ckpt"
        assert not (dest / "enc.ckpt").exists()
    else:
        assert path == (dest / "enc.ckpt").absolute()
        assert path.is_symlink() == (strategy is LocalStrategy.SYMLINK)
    if strategy is LocalStrategy.SYMLINK:
        assert path.resolve() == (local_source / "model.ckpt").resolve()


def test_copy_skip_cache_returns_the_file_that_exists(local_source, tmp_path):
    # SpeechBrain returned a path that did not exist for this strategy.
    path = fetch("model.ckpt", local_source, tmp_path / "d", "enc.ckpt", LocalStrategy.COPY_SKIP_CACHE)
    assert path.is_file() and not path.is_symlink()
    assert path.parent == (tmp_path / "d").absolute()


def test_default_save_filename_is_the_source_name(local_source, tmp_path):
    assert fetch("model.ckpt", local_source, tmp_path / "d").name == "model.ckpt"


def test_no_savedir_means_no_link(local_source):
    assert fetch("model.ckpt", local_source) == (local_source / "model.ckpt").absolute()


def test_source_equal_to_savedir_makes_no_self_link(local_source):
    path = fetch("model.ckpt", local_source, local_source, "model.ckpt", LocalStrategy.SYMLINK)
    assert path == (local_source / "model.ckpt").absolute()
    assert not path.is_symlink()
    assert path.read_bytes() == b"weights-v1"


def test_self_symlink_is_reported(tmp_path):
    loop = tmp_path / "loop.ckpt"
    loop.symlink_to(loop)
    with pytest.raises(FetchError) as info:
        fetch("loop.ckpt", FetchSource(FetchFrom.LOCAL, str(tmp_path)), tmp_path, "loop.ckpt")
    assert "loop.ckpt" in str(info.value)


def test_source_that_is_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "model.ckpt").write_bytes(b"abc")
    linked_dir = tmp_path / "linked"
    linked_dir.symlink_to(real, target_is_directory=True)
    (real / "alias.ckpt").symlink_to(real / "model.ckpt")
    for strategy in ALL:
        dest = tmp_path / f"d-{strategy.name}"
        assert fetch("model.ckpt", linked_dir, dest, local_strategy=strategy).read_bytes() == b"abc"
        assert fetch("alias.ckpt", real, dest, local_strategy=strategy).read_bytes() == b"abc"


@pytest.mark.parametrize("strategy", [LocalStrategy.SYMLINK, LocalStrategy.COPY])
def test_replacing_a_collected_file_follows_the_source(local_source, tmp_path, strategy):
    dest = tmp_path / "dest"
    fetch("model.ckpt", local_source, dest, "enc.ckpt", strategy)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.ckpt").write_bytes(b"weights-from-elsewhere")
    path = fetch("model.ckpt", other, dest, "enc.ckpt", strategy)
    assert path.read_bytes() == b"weights-from-elsewhere"
    # an edited source file is copied again, not silently reused
    time.sleep(0.01)
    (other / "model.ckpt").write_bytes(b"weights-edited")
    assert fetch("model.ckpt", other, dest, "enc.ckpt", strategy).read_bytes() == b"weights-edited"
    assert not list(dest.glob(".*.tmp"))


def test_strategy_change_relinks(local_source, tmp_path):
    dest = tmp_path / "dest"
    assert fetch("model.ckpt", local_source, dest, local_strategy=LocalStrategy.SYMLINK).is_symlink()
    assert not fetch("model.ckpt", local_source, dest, local_strategy=LocalStrategy.COPY).is_symlink()


def test_missing_local_file(local_source, tmp_path):
    with pytest.raises(FetchError, match="does not exist") as info:
        fetch("nope.ckpt", local_source, tmp_path / "d")
    assert isinstance(info.value, ValueError) and isinstance(info.value, PretrainerError)
    assert "nope.ckpt" in str(info.value) and str(local_source) in str(info.value)


def test_local_path_that_is_a_folder(local_source, tmp_path):
    (local_source / "sub").mkdir()
    with pytest.raises(FetchError, match="is a folder, not a file"):
        fetch("sub", local_source, tmp_path / "d")


@pytest.mark.parametrize("bad", ["../evil.ckpt", "/etc/passwd", "a/b.ckpt", "..", "", ".pl_pretrain"])
def test_save_filename_cannot_leave_the_folder(local_source, tmp_path, bad):
    with pytest.raises(ConfigurationError, match="not a plain file name"):
        fetch("model.ckpt", local_source, tmp_path / "d", save_filename=bad)
    assert not (tmp_path / "evil.ckpt").exists()


def test_filename_cannot_climb_out_of_the_source(local_source, tmp_path):
    with pytest.raises(ConfigurationError, match="without '..'"):
        fetch("../secret.ckpt", local_source, tmp_path / "d")


def test_bad_strategy_is_a_clear_error(local_source, tmp_path):
    with pytest.raises(ConfigurationError, match="not a LocalStrategy"):
        fetch("model.ckpt", local_source, tmp_path / "d", local_strategy="copy")


# ------------------------------------------------------------------------------------------
# URLs, against a loopback server
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ALL)
def test_url_every_strategy(http_server, tmp_path, strategy):
    http_server.add("models/enc.ckpt", b"url-bytes" * 1000)
    dest = tmp_path / "dest"
    path = fetch("enc.ckpt", f"{http_server.url}/models", dest, "encoder.ckpt", strategy)
    # URLs have no cache of their own: the file is downloaded into the folder whatever the strategy.
    assert path == (dest / "encoder.ckpt").absolute()
    assert path.read_bytes() == b"url-bytes" * 1000
    assert len(http_server.gets("/models/enc.ckpt")) == 1


def test_url_is_downloaded_once(http_server, tmp_path):
    http_server.add("m/enc.ckpt", b"x" * 10)
    for _ in range(3):
        fetch("enc.ckpt", f"{http_server.url}/m", tmp_path / "d")
    assert http_server.count("GET") == 1


def test_url_without_savedir_goes_to_the_cache(http_server, tmp_path):
    http_server.add("m/enc.ckpt", b"cached")
    first = fetch("enc.ckpt", f"{http_server.url}/m")
    second = fetch("enc.ckpt", f"{http_server.url}/m")
    assert first == second and first.read_bytes() == b"cached"
    assert str(first).startswith(os.environ["PL_PRETRAIN_CACHE"])
    assert http_server.count("GET") == 1


def test_url_404(http_server, tmp_path):
    with pytest.raises(FetchError, match="HTTP 404") as info:
        fetch("missing.ckpt", f"{http_server.url}/m", tmp_path / "d")
    assert isinstance(info.value, ValueError)
    assert f"{http_server.url}/m/missing.ckpt" in str(info.value)
    assert not (tmp_path / "d" / "missing.ckpt").exists()
    assert not list((tmp_path / "d").glob(".*.tmp"))


def test_url_offline_is_a_clear_error(http_server, tmp_path):
    http_server.add("m/enc.ckpt", b"x")
    with pytest.raises(OfflineError, match="network is off") as info:
        fetch("enc.ckpt", f"{http_server.url}/m", tmp_path / "d", fetch_config=FetchConfig(allow_network=False))
    assert isinstance(info.value, ValueError)
    assert http_server.requests == []


def test_url_offline_uses_what_was_collected(http_server, tmp_path):
    http_server.add("m/enc.ckpt", b"x")
    fetch("enc.ckpt", f"{http_server.url}/m", tmp_path / "d")
    http_server.reset_log()
    path = fetch("enc.ckpt", f"{http_server.url}/m", tmp_path / "d", fetch_config=FetchConfig(allow_network=False))
    assert path.read_bytes() == b"x"
    assert http_server.requests == []


def test_url_download_appears_whole(http_server, tmp_path):
    payload = os.urandom(2 * 1024 * 1024)
    http_server.add("m/big.ckpt", payload)
    http_server.fail("big.ckpt", Fault("slow", times=1, delay=0.02))
    dest = tmp_path / "d"
    seen_sizes = set()
    worker = threading.Thread(target=fetch, args=("big.ckpt", f"{http_server.url}/m", dest))
    worker.start()
    deadline = time.monotonic() + 30
    while worker.is_alive() and time.monotonic() < deadline:
        if (dest / "big.ckpt").exists():
            seen_sizes.add((dest / "big.ckpt").stat().st_size)
        time.sleep(0.005)
    worker.join(30)
    assert seen_sizes <= {len(payload)}
    assert (dest / "big.ckpt").read_bytes() == payload


def test_url_truncated_after_collection_is_fetched_again(http_server, tmp_path):
    http_server.add("m/enc.ckpt", b"0123456789" * 100)
    path = fetch("enc.ckpt", f"{http_server.url}/m", tmp_path / "d")
    path.write_bytes(path.read_bytes()[:500])  # something else cut it short
    assert fetch("enc.ckpt", f"{http_server.url}/m", tmp_path / "d").read_bytes() == b"0123456789" * 100
    assert http_server.count("GET") == 2


def test_url_overwrite_downloads_again(http_server, tmp_path):
    http_server.add("m/enc.ckpt", b"v1")
    fetch("enc.ckpt", f"{http_server.url}/m", tmp_path / "d")
    http_server.add("m/enc.ckpt", b"v2")
    assert fetch("enc.ckpt", f"{http_server.url}/m", tmp_path / "d").read_bytes() == b"v1"
    path = fetch("enc.ckpt", f"{http_server.url}/m", tmp_path / "d", fetch_config=FetchConfig(overwrite=True))
    assert path.read_bytes() == b"v2"


# ------------------------------------------------------------------------------------------
# The Hub, through huggingface_hub, against a loopback Hub
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ALL)
def test_hub_every_strategy(hub, tmp_path, strategy):
    data = ckpt_bytes(module(0))
    commit = hub.add_file("org/asr", "encoder.ckpt", data)
    dest = tmp_path / "dest"
    fetched = fetch_file("encoder.ckpt", "org/asr", dest, "enc.ckpt", strategy)
    assert fetched.path.read_bytes() == data
    assert fetched.commit == commit
    assert fetched.fetch_from is FetchFrom.HUGGING_FACE
    if strategy is LocalStrategy.NO_LINK:
        assert "snapshots" in str(fetched.path)
    else:
        assert fetched.path == (dest / "enc.ckpt").absolute()
        assert fetched.path.is_symlink() == (strategy is LocalStrategy.SYMLINK)
    cache_blobs = list(pathlib.Path(os.environ["HF_HUB_CACHE"]).rglob("blobs/*"))
    if strategy is LocalStrategy.COPY_SKIP_CACHE:
        assert cache_blobs == []
        assert not list((dest / RECORD_DIR).glob("hub-*"))
    else:
        assert len(cache_blobs) == 1
    assert hub.downloads("encoder.ckpt") == 1


def test_hub_subfolder(hub, tmp_path):
    # A subfolder of a Hub repo is asked for explicitly: a plain 'org/asr/ckpts' is a (missing) local path.
    hub.add_file("org/asr", "ckpts/encoder.ckpt", b"in-a-subfolder")
    source = FetchSource(FetchFrom.HUGGING_FACE, "org/asr/ckpts")
    assert fetch("encoder.ckpt", source, tmp_path / "d").read_bytes() == b"in-a-subfolder"


def test_hub_revision_reaches_the_server_and_changes_the_file(hub, tmp_path):
    hub.add_file("org/asr", "enc.ckpt", b"main-bytes")
    hub.add_file("org/asr", "enc.ckpt", b"v2-bytes", revision="v2")
    dest = tmp_path / "d"
    assert fetch("enc.ckpt", "org/asr", dest).read_bytes() == b"main-bytes"
    path = fetch("enc.ckpt", "org/asr", dest, fetch_config=FetchConfig(revision="v2"))
    assert path.read_bytes() == b"v2-bytes"
    assert any("/resolve/v2/enc.ckpt" in r.path for r in hub.requests)
    # and back: the old revision's file is not reused for the new one, nor the reverse
    assert fetch("enc.ckpt", "org/asr", dest).read_bytes() == b"main-bytes"


def test_hub_collected_file_is_reused_without_asking(hub, tmp_path):
    hub.add_file("org/asr", "enc.ckpt", b"v1")
    fetch("enc.ckpt", "org/asr", tmp_path / "d")
    hub.reset_log()
    hub.add_file("org/asr", "enc.ckpt", b"v1-updated")
    assert fetch("enc.ckpt", "org/asr", tmp_path / "d").read_bytes() == b"v1"
    assert hub.requests == []
    updated = fetch("enc.ckpt", "org/asr", tmp_path / "d", fetch_config=FetchConfig(allow_updates=True))
    assert updated.read_bytes() == b"v1-updated"


def test_hub_token_reaches_the_server(hub, tmp_path):
    hub.add_file("org/private", "enc.ckpt", b"secret-weights", token="hf_secret")
    path = fetch("enc.ckpt", "org/private", tmp_path / "d", fetch_config=FetchConfig(token="hf_secret"))
    assert path.read_bytes() == b"secret-weights"
    assert {r.headers.get("authorization") for r in hub.requests} == {"Bearer hf_secret"}


def test_hub_token_none_keeps_hf_token(hub, tmp_path, monkeypatch):
    # SpeechBrain's FetchConfig(use_auth_token=False) silenced HF_TOKEN; None must not.
    hub.add_file("org/private", "enc.ckpt", b"secret-weights", token="hf_env")
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert fetch("enc.ckpt", "org/private", tmp_path / "d").read_bytes() == b"secret-weights"
    assert hub.requests[0].headers.get("authorization") == "Bearer hf_env"


def test_hub_token_false_sends_none(hub, tmp_path, monkeypatch):
    hub.add_file("org/private", "enc.ckpt", b"secret-weights", token="hf_env")
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    with pytest.raises(FetchError, match="HTTP 401"):
        fetch("enc.ckpt", "org/private", tmp_path / "d", fetch_config=FetchConfig(token=False))
    assert all("authorization" not in r.headers for r in hub.requests)


def test_token_is_not_in_the_config_repr():
    assert "hf_secret" not in repr(FetchConfig(token="hf_secret"))


def test_hub_404_file(hub, tmp_path):
    hub.add_file("org/asr", "enc.ckpt", b"x")
    with pytest.raises(FetchError, match="File 'dec.ckpt' does not exist in hub repo 'org/asr'") as info:
        fetch("dec.ckpt", "org/asr", tmp_path / "d")
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "d" / "dec.ckpt").exists()


def test_hub_401_private_repo(hub, tmp_path):
    hub.add_file("org/private", "enc.ckpt", b"x", token="right")
    with pytest.raises(FetchError, match="HTTP 401") as info:
        fetch("enc.ckpt", "org/private", tmp_path / "d", fetch_config=FetchConfig(token="wrong"))
    assert "HF_TOKEN" in str(info.value) and "org/private" in str(info.value)
    assert "wrong" not in str(info.value)


def test_hub_unknown_revision(hub, tmp_path):
    hub.add_file("org/asr", "enc.ckpt", b"x")
    with pytest.raises(FetchError, match="Revision 'v9' does not exist"):
        fetch("enc.ckpt", "org/asr", tmp_path / "d", fetch_config=FetchConfig(revision="v9"))


def test_hub_offline_with_nothing_cached(hub, tmp_path):
    hub.add_file("org/asr", "enc.ckpt", b"x")
    with pytest.raises(OfflineError, match="not in the Hugging Face cache") as info:
        fetch("enc.ckpt", "org/asr", tmp_path / "d", fetch_config=FetchConfig(allow_network=False))
    assert isinstance(info.value, ValueError)
    assert hub.requests == []


@pytest.mark.parametrize("strategy", [LocalStrategy.SYMLINK, LocalStrategy.NO_LINK])
def test_hub_offline_uses_the_cache(hub, tmp_path, strategy):
    hub.add_file("org/asr", "enc.ckpt", b"cached-bytes")
    fetch("enc.ckpt", "org/asr", tmp_path / "first", local_strategy=strategy)
    hub.reset_log()
    path = fetch(
        "enc.ckpt",
        "org/asr",
        tmp_path / "second",
        local_strategy=strategy,
        fetch_config=FetchConfig(allow_network=False),
    )
    assert path.read_bytes() == b"cached-bytes"
    assert hub.requests == []


def test_hub_bad_repo_id_is_not_requested(hub, tmp_path):
    with pytest.raises(FetchError, match="not a Hugging Face Hub repo id"):
        fetch("enc.ckpt", "not a repo!", tmp_path / "d")
    assert hub.requests == []
