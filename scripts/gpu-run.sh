#!/usr/bin/env bash
# On a GPU machine, from the repository root: runs the GPU tests (plain and under
# compute-sanitizer memcheck) and the kernel benchmarks, and writes logs to $OUT (default
# ./gpu-out). Uses .device-bundle/ when present (programs packed by ../shared/tools/device-bundle
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
  for t in gpu_kernels_test gpu_tier_test; do
    [[ -x build/default/tests/gpu/$t ]] && ln -sf "../tests/gpu/$t" "$bin/$t"
  done
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
rc=0
if [[ $what == tests || $what == all ]]; then
  $bin/gpu_kernels_test 2>&1 | tail -n 30 | tee "$out/gpu_kernels_test.txt" || rc=1
  $bin/gpu_tier_test 2>&1 | tail -n 5 | tee "$out/gpu_tier_test.txt" || rc=1
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
fi
exit $rc
