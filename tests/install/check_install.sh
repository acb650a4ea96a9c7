#!/usr/bin/env bash
# Installs the build tree into a temp prefix and builds + runs a consumer project that uses
# find_package(kvdn) and kvdn::client (and kvdn::connector from a build with CUDA), as an
# engine's build would.
#   check_install.sh <kvdn build dir>
set -euo pipefail
build=$1
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
cmake -S "$here/consumer" -B "$tmp/build" -G Ninja -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/build" >/dev/null
"$tmp/build/consumer"
if [[ -x $tmp/build/consumer_connector ]]; then
  "$tmp/build/consumer_connector"
fi
# The Python package from the same prefix finds the installed library by itself.
PYTHONPATH="$tmp/prefix/lib/python3/dist-packages" PYTHONDONTWRITEBYTECODE=1 python3 -c \
  'import kvdn, kvdn._native as n, kvdn._install_path as p; assert n.lib().kvdn_abi_version() == n.ABI_VERSION; print("python: kvdn loads", p.LIBRARY)'
