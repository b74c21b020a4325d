"""Shared fixtures: loopback servers, an isolated Hub cache, the multi-rank harness.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported, so the Hub
look-alike starts and the environment is set here, before any test imports pl_pretrain. Every
rank the harness spawns inherits the environment and reaches the same server.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

_HERE = pathlib.Path(__file__).parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from servers import FileServer, HubServer  # noqa: E402

_SESSION_HOME = tempfile.mkdtemp(prefix="pl_pretrain_tests_")
_HUB = HubServer().start()
os.environ.update(
    {
        "HF_ENDPOINT": _HUB.url,
        "HF_HOME": os.path.join(_SESSION_HOME, "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_ETAG_TIMEOUT": "10",
        "PL_PRETRAIN_CACHE": os.path.join(_SESSION_HOME, "pl_pretrain_cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(_HERE), os.environ.get("PYTHONPATH", "")])),
    }
)
for _name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "WORLD_SIZE", "RANK"):
    os.environ.pop(_name, None)

import pytest  # noqa: E402

# The object stores (S3, GCS, Azure on loopback) and their fixtures: s3, gcs, azure, store.
pytest_plugins = ["objectstores"]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The Hub look-alike, emptied, with a fresh Hub cache for this test."""
    import huggingface_hub.constants as constants

    _HUB.clear()
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    yield _HUB
    _HUB.clear()


@pytest.fixture
def http_server():
    """A plain HTTP file server on 127.0.0.1 for this test."""
    with FileServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _isolated_url_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PL_PRETRAIN_CACHE", str(tmp_path / "pl_pretrain_cache"))
