#!/usr/bin/env bash
# What the object-store tests need beyond the Python packages (which `pip install -e ".[test,cloud]"`
# brings: s3fs, gcsfs, adlfs, moto[server], gcp-storage-emulator): Azurite, the Azure Blob Storage
# emulator, from the npm registry, into tests/.node (where tests/objectstores.py looks for it).
#
# Nothing is started here: the tests start every server themselves, on 127.0.0.1, once per session
# (moto and gcp-storage-emulator in the test process, Azurite as a child process), so that
# `python -m pytest` alone works wherever these are installed.
set -euo pipefail
cd "$(dirname "$0")/.."

AZURITE_VERSION=3.35.0

if ! command -v npm >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
if [ ! -x tests/.node/node_modules/.bin/azurite-blob ]; then
    mkdir -p tests/.node
    npm install --silent --no-audit --no-fund --prefix tests/.node "azurite@${AZURITE_VERSION}"
fi
tests/.node/node_modules/.bin/azurite-blob --version
