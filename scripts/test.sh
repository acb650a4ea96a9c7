#!/usr/bin/env bash
# The README's test command: installs missing packages, configures, builds and runs every test that
# this machine can run (GPU tests skip themselves without a GPU).
#   scripts/test.sh            default preset (RelWithDebInfo), all tests
#   scripts/test.sh asan       unit, integration and cluster tests under AddressSanitizer + UBSan
#   scripts/test.sh tsan       unit tests under ThreadSanitizer
#   scripts/test.sh fuzz [S]   the libFuzzer targets for S seconds each (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-default}
scripts/install-deps.sh

jobs=$(nproc)
case "$preset" in
  default | asan | tsan)
    cmake --preset "$preset" >/dev/null
    cmake --build --preset "$preset" -j "$jobs"
    ctest --preset "$preset"
    ;;
  fuzz)
    seconds=${2:-60}
    cmake --preset fuzz >/dev/null
    cmake --build --preset fuzz -j "$jobs" --target chunk_decode_fuzzer frames_fuzzer
    for f in build/fuzz/tests/fuzz/*_fuzzer; do
      name=$(basename "$f")
      corpus=$(mktemp -d)
      cp tests/fuzz/corpus/"${name%_fuzzer}"/* "$corpus"/ 2>/dev/null || true
      echo "fuzz: $name for ${seconds}s"
      "$f" -max_total_time="$seconds" -print_final_stats=1 "$corpus" 2>&1 | tail -n 12
      rm -rf "$corpus"
    done
    ;;
  *)
    echo "usage: scripts/test.sh [default|asan|tsan|fuzz [seconds]]" >&2
    exit 2
    ;;
esac
