#!/usr/bin/env bash
# On a GPU machine, from the repository root: runs the GPU tests (plain and under
# compute-sanitizer memcheck), the kernel benchmarks and the engine-side connector benchmark
# (kvdnd + KvConnector, host path and GPU tier), and writes logs to $OUT (default ./gpu-out). Uses .device-bundle/ when present (programs packed by ../shared/tools/device-bundle
# for the lent GPU machine), else build/default's programs (after scripts/test.sh built them).
#   scripts/gpu-run.sh [tests|bench|all] [--quick]
set -uo pipefail
what=${1:-all}
quick=${2:-}
out=${OUT:-gpu-out}
mkdir -p "$out"
if [[ -f .device-bundle/env.sh ]]; then
  source .device-bundle/env.sh
  bin=.device-bundle/bin
else
  bin=build/default/bin
  mkdir -p "$bin"
  for t in gpu_kernels_test gpu_tier_test kv_connector_test; do
    [[ -x build/default/tests/gpu/$t ]] && ln -sf "../tests/gpu/$t" "$bin/$t"
  done
fi
# The connector's tests and benchmark start kvdnd: the packed one, or the build's.
[[ -x $bin/kvdnd ]] && export KVDN_KVDND=$PWD/$bin/kvdnd
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
rc=0
if [[ $what == tests || $what == all ]]; then
  $bin/gpu_kernels_test 2>&1 | tail -n 30 | tee "$out/gpu_kernels_test.txt" || rc=1
  $bin/gpu_tier_test 2>&1 | tail -n 5 | tee "$out/gpu_tier_test.txt" || rc=1
  if [[ -x $bin/kv_connector_test ]]; then
    $bin/kv_connector_test 2>&1 | tail -n 5 | tee "$out/kv_connector_test.txt" || rc=1
    timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 $bin/kv_connector_test \
      > "$out/kv_connector_memcheck.txt" 2>&1 || rc=1
    tail -n 1 "$out/kv_connector_memcheck.txt"
  fi
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 $bin/gpu_kernels_test \
    --gtest_filter='*BitForBit*:*Skipped*:*Budget*:*Bad*:*EdgeCases*' > "$out/memcheck.txt" 2>&1 || rc=1
  tail -n 3 "$out/memcheck.txt"
  # Shared-memory hazards (the tensor-core decode kernel's cp.async / ldmatrix ring).
  timeout 300 compute-sanitizer --tool racecheck --error-exitcode 9 $bin/gpu_kernels_test \
    --gtest_filter='*EdgeCases*' > "$out/racecheck.txt" 2>&1 || rc=1
  tail -n 3 "$out/racecheck.txt"
fi
if [[ $what == bench || $what == all ]]; then
  $bin/kernels_bench --json "$out/kernels.json" $quick 2>&1 | tee "$out/kernels_bench.txt" || rc=1
  python3 bench/kernels/sdpa_peer.py $quick --json "$out/sdpa.json" --ours "$out/kernels.json" 2>&1 |
    tee "$out/sdpa.txt" || rc=1
  if [[ -x $bin/connector_bench ]]; then
    $bin/connector_bench 2>&1 | tee "$out/connector_bench.txt" || rc=1
    $bin/connector_bench --gpu-tier-mib 12288 2>&1 | tee "$out/connector_bench_gpu_tier.txt" || rc=1
  fi
fi
exit $rc
