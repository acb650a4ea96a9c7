#!/usr/bin/env bash
# Installs missing packages, builds (default preset) and runs one benchmark program.
#   scripts/bench.sh storage [storage_bench flags]     e.g. --sizes-mib 1,4,32 --disk-total-mib 1024
#   scripts/bench.sh e2e [e2e_bench flags]             e.g. --sizes-mib 1,4 --clients 1,4 --seconds 2 --rounds 5
#   scripts/bench.sh transfer [transfer_bench flags]   e.g. --sizes-mib 4 --transports shm --rounds 1
#   scripts/bench.sh cluster [cluster_bench flags]     (root) e.g. --rounds 3 --seqs 24 --streams 8
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-storage}
shift || true
scripts/install-deps.sh
cmake --preset default >/dev/null
targets=("${name}_bench")
[[ "$name" == cluster ]] && targets+=(kvdnd kvdnctl)  # scripts/cluster.sh runs them
cmake --build --preset default -j "$(nproc)" --target "${targets[@]}"
exec "build/default/bin/${name}_bench" "$@"
