#!/usr/bin/env bash
# ucx_modes.sh: ucx_perftest ucp_am_bw on this host's loopback, per UCX transport set, without and
# with UCX's peer error handling (-e). The figures behind transfer/README.md's choice of failure
# detection per transport kind. Usage: bench/transfer/ucx_modes.sh [size_bytes] [iterations]
set -uo pipefail
size=${1:-4194304}
iters=${2:-300}
port=13337
echo "# ucx_perftest ucp_am_bw, ${size} B, ${iters} iterations (+30 warm-up)"
echo "# date: $(date -u +%FT%TZ)  host: $(hostname)  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs) ($(nproc) cores)"
echo "# ucx: $(ucx_info -v | head -1)  revision: $(git -C "$(dirname "$0")" rev-parse --short HEAD 2>/dev/null)"
echo "# command: $0 $*"
echo
echo "| UCX_TLS | peer error handling | MB/s (2^20) | note |"
echo "|---|---|---|---|"
for tls in "tcp" "tcp,cma" "posix,cma"; do
  for e in "" "-e"; do
    UCX_TLS=$tls ucx_perftest -p $port -t ucp_am_bw -s "$size" -n "$iters" -w 30 $e >/tmp/ucx_modes_srv.log 2>&1 &
    srv=$!
    sleep 1
    out=$(UCX_TLS=$tls timeout 60 ucx_perftest 127.0.0.1 -p $port -t ucp_am_bw -s "$size" -n "$iters" -w 30 $e 2>&1)
    wait $srv 2>/dev/null
    bw=$(echo "$out" | awk '/^Final:/ {print $6}')
    note=""
    [[ -z "$bw" ]] && { bw="-"; note=$(echo "$out" | grep -m1 -o "no active messages transport.*" | cut -c1-90); }
    echo "| $tls | $([[ -n $e ]] && echo on || echo off) | $bw | $note |"
    port=$((port + 1))
  done
done
