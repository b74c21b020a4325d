"""Sources -> a local file: one module per concept, the public names re-exported here.

`fetch` brings one file from a local folder, an ``http(s)://`` URL or a Hugging Face Hub repo to a
local path, and (when a `savedir` is given) places it there under `save_filename` by the chosen
`LocalStrategy`. The names and their meaning follow SpeechBrain's ``speechbrain.utils.fetching``;
what differs is what can go wrong:

- a file appears at its destination only whole, and each destination is guarded by a file lock
  (`placement`);
- every placed file gets a record saying where it came from, so a changed source or revision is
  fetched again instead of silently reusing the old file (`records`);
- pinned checksums are verified, and a bad file is removed (`integrity`);
- the Hub is reached only through ``huggingface_hub.hf_hub_download`` (`hub`), URLs are downloaded
  with retries (`http`), and no credential is ever shown (`redaction`);
- every failure is a `FetchError` (a `ValueError`) that names the source, the file and the cause.

The modules: `sources` (what is asked for and given back), `fetch` (the orchestration), `kinds`
(the interface of one source kind), `local`, `http`, `hub`, `objectstore` (the kinds; `stores`: what
differs between the object stores), `network` (retries,
offline switch, progress), `download` (one URL download: resume, Retry-After, bounds), `shards`
(a sharded checkpoint's shards at once), `placement`, `records`, `integrity`, `redaction`. See
docs/architecture.md. This package knows nothing about ranks or loadables.
"""

from pl_pretrain._constants import RECORD_DIR
from pl_pretrain.fetching.fetch import fetch, fetch_file
from pl_pretrain.fetching.integrity import discard_unreadable, file_sha256, parse_checksum, verify_sha256
from pl_pretrain.fetching.redaction import redact_url
from pl_pretrain.fetching.shards import fetch_shards
from pl_pretrain.fetching.sources import (
    FetchConfig,
    Fetched,
    FetchFrom,
    FetchSource,
    LocalStrategy,
    as_fetch_config,
    as_fetch_source,
    as_local_strategy,
    check_file_name,
    guess_source,
)

__all__ = [
    "FetchFrom",
    "FetchSource",
    "LocalStrategy",
    "FetchConfig",
    "Fetched",
    "fetch",
    "fetch_file",
    "fetch_shards",
    "guess_source",
    "file_sha256",
    "parse_checksum",
    "check_file_name",
    "redact_url",
    "verify_sha256",
    "discard_unreadable",
    "as_fetch_config",
    "as_local_strategy",
    "as_fetch_source",
    "RECORD_DIR",
]
