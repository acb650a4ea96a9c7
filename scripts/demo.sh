#!/usr/bin/env bash
# The README's main job: installs missing packages, builds, then runs the demo — kvdnd on its
# embedded single-node default and a synthetic multi-turn chat + RAG workload through the SDK.
#   scripts/demo.sh [kvdn_demo flags]     e.g. --requests 400 --workers 2 --layers 4
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake --preset default >/dev/null
cmake --build --preset default -j "$(nproc)" --target kvdnd kvdnctl kvdn_demo
exec build/default/bin/kvdn_demo "$@"
