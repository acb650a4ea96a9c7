#!/usr/bin/env bash
# Installs every Debian 12 package kvdn needs to build, test and benchmark. Idempotent and quiet:
# packages already present are skipped; apt output goes to a log that is printed only on failure.
set -euo pipefail

PACKAGES=(
  # toolchain
  build-essential cmake ninja-build ccache pkg-config git
  # clang: libFuzzer target, clang-format / clang-tidy
  clang libclang-rt-14-dev clang-format clang-tidy
  # libraries
  libabsl-dev libspdlog-dev libfmt-dev libxxhash-dev librocksdb-dev
  # daemon, SDK and CLI: gRPC + protobuf, civetweb (HTTP /metrics), CLI11
  libgrpc++-dev libssl-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  libcivetweb-dev civetweb libcli11-dev
  # data plane: UCX (ucx-utils brings ucx_perftest, the transfer benchmark's ceiling)
  libucx-dev ucx-utils
  # cluster membership: etcd v3 (the cluster tests start their own); iproute2 for the
  # network-namespace cluster (scripts/cluster.sh)
  etcd-server iproute2
  # tests and benchmarks: promtool checks /metrics; Redis 7 is the e2e benchmark's peer
  libgtest-dev libgmock-dev googletest libbenchmark-dev prometheus redis-server libhiredis-dev
  # deploy/ checks (tests/deploy): YAML
  python3 python3-yaml
  # TLS tests: certificates made with the openssl command
  openssl
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]} == 0)); then
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
fi

log=$(mktemp -t kvdn-apt.XXXXXX)
echo "install-deps: installing ${#missing[@]} package(s): ${missing[*]}"
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  echo "install-deps: apt-get failed; its output:" >&2
  cat "$log" >&2
  exit 1
fi
rm -f "$log"
