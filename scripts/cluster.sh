#!/usr/bin/env bash
# A kvdn cluster on one machine: N kvdnd, each in its own network namespace joined to a bridge by
# a veth pair, and one etcd on the bridge. For trying the cluster by hand, and used by the cluster
# tests and bench/cluster. Needs root (ip netns) and a build (scripts/test.sh or scripts/demo.sh).
#
#   sudo scripts/cluster.sh up               # 3 nodes; prints how to reach them
#   sudo scripts/cluster.sh status
#   sudo scripts/cluster.sh down
#
# Options of `up` (all optional):
#   --dir DIR             state: logs, data, sockets, cluster.env (default /tmp/kvdn-cluster)
#   --nodes N             2..9 (default 3)
#   --replicas R          copies per chunk (default 1)
#   --ttl-ms MS           membership lease TTL (default 10000)
#   --peer-timeout-ms MS  deadline of each call to a peer (default 1000)
#   --host-tier-mib MIB   host tier of each node (default 512)
#   --prefix P            names of the namespaces, bridge and veths (default kvdn; <= 6 chars)
#   --subnet N            the bridge's network is 10.N.0.0/24 (default 77)
#   --bin DIR             where kvdnd and kvdnctl are (default build/default/bin)
#
# Exit status of `up`: 0 up; 3 the prefix's names or the subnet are taken on this host (nothing
# was made: pick others); 1 any other failure (what was made is torn down).
#
# Layout: bridge <P>br = 10.N.0.1 (etcd listens there); node i is namespace <P>n<i>, its eth0 is
# 10.N.0.<10+i> (gRPC :7070, HTTP :9470, unix socket DIR/node<i>/kvdnd.sock inside); the root
# side of its veth is <P>h<i>. UCX between nodes runs over tcp on eth0 (UCX_NET_DEVICES), so
# peer transfers cross the veth links. cluster.env lists it all (sourced by the tests).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd="${1:-}"
shift || true
dir=/tmp/kvdn-cluster
nodes=3
replicas=1
ttl_ms=10000
peer_timeout_ms=1000
host_mib=512
prefix=kvdn
subnet=77
bin="$here/build/default/bin"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --replicas) replicas="$2"; shift 2 ;;
    --ttl-ms) ttl_ms="$2"; shift 2 ;;
    --peer-timeout-ms) peer_timeout_ms="$2"; shift 2 ;;
    --host-tier-mib) host_mib="$2"; shift 2 ;;
    --prefix) prefix="$2"; shift 2 ;;
    --subnet) subnet="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    *) echo "cluster.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

die() { echo "cluster.sh: $*" >&2; exit 1; }
# A name or subnet already taken on this host: exit status 3, so a caller can pick others.
taken() { echo "cluster.sh: $*" >&2; exit 3; }

down() {
  local env="$dir/cluster.env"
  [[ -f "$env" ]] || { echo "cluster.sh: no cluster at $dir"; return 0; }
  # shellcheck disable=SC1090
  source "$env"
  for ((i = 1; i <= KVDN_NODES; i++)); do
    local pid_var="KVDN_NODE${i}_PID" ns_var="KVDN_NODE${i}_NS"
    local pid="${!pid_var:-}"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; fi
    ip netns del "${!ns_var}" 2>/dev/null || true
    ip link del "${KVDN_PREFIX}h${i}" 2>/dev/null || true
  done
  if [[ -n "${KVDN_ETCD_PID:-}" ]] && kill -0 "$KVDN_ETCD_PID" 2>/dev/null; then
    kill -TERM "$KVDN_ETCD_PID" 2>/dev/null || true
  fi
  for ((i = 1; i <= KVDN_NODES; i++)); do
    local pid_var="KVDN_NODE${i}_PID"
    local pid="${!pid_var:-}"
    for _ in $(seq 50); do
      [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    [[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null || true
  done
  ip link del "${KVDN_PREFIX}br" 2>/dev/null || true
  rm -f "$env"
  echo "cluster.sh: $KVDN_NODES-node cluster at $dir is down"
}

up() {
  [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces)"
  command -v ip >/dev/null || die "ip (iproute2) is missing: scripts/install-deps.sh"
  command -v etcd >/dev/null || die "etcd is missing: scripts/install-deps.sh"
  [[ -x "$bin/kvdnd" && -x "$bin/kvdnctl" ]] || die "no kvdnd/kvdnctl in $bin: build first"
  [[ "$nodes" =~ ^[2-9]$ ]] || die "--nodes must be 2..9"
  [[ ${#prefix} -le 6 && "$prefix" =~ ^[a-z0-9]+$ ]] || die "--prefix: 1-6 of [a-z0-9]"
  [[ -f "$dir/cluster.env" ]] && die "a cluster is up at $dir: cluster.sh down --dir $dir first"
  [[ "$subnet" =~ ^[0-9]+$ && "$subnet" -ge 1 && "$subnet" -le 254 ]] || die "--subnet: 1..254"
  # Nothing of this name or subnet may exist: a route to 10.$subnet.0.0/24 through another link
  # (a cluster left behind by a killed run, or someone else's network) would take this cluster's
  # traffic, and the nodes would not reach etcd or each other. Checked before anything is made,
  # so a refusal tears nothing down.
  local routed
  routed=$(ip -4 route show to match "10.$subnet.0.1" 2>/dev/null | grep -v '^default' || true)
  [[ -z "$routed" ]] || taken "subnet 10.$subnet.0.0/24 is in use here (route: $routed); pick another --subnet, or remove what holds it"
  ! ip link show "${prefix}br" >/dev/null 2>&1 || taken "link ${prefix}br exists: pick another --prefix, or cluster.sh down the cluster that made it"
  ! ip netns list 2>/dev/null | grep -q "^${prefix}n1\b" || taken "network namespace ${prefix}n1 exists: pick another --prefix"
  mkdir -p "$dir"
  local net="10.$subnet.0"
  local env="$dir/cluster.env"
  {
    echo "KVDN_DIR=$dir"
    echo "KVDN_PREFIX=$prefix"
    echo "KVDN_NODES=$nodes"
    echo "KVDN_BRIDGE=${prefix}br"
    echo "KVDN_ETCD=$net.1:2379"
  } >"$env"
  # Whatever fails from here on leaves nothing behind.
  trap 'rc=$?; if [[ $rc -ne 0 ]]; then echo "cluster.sh: up failed; tearing down" >&2; down >/dev/null 2>&1 || true; fi' EXIT

  ip link add "${prefix}br" type bridge
  ip addr add "$net.1/24" dev "${prefix}br"
  ip link set "${prefix}br" up

  mkdir -p "$dir/etcd"
  etcd --name "${prefix}etcd" --data-dir "$dir/etcd/data" \
    --listen-client-urls "http://$net.1:2379" --advertise-client-urls "http://$net.1:2379" \
    --listen-peer-urls "http://$net.1:2380" --initial-advertise-peer-urls "http://$net.1:2380" \
    --initial-cluster "${prefix}etcd=http://$net.1:2380" >"$dir/etcd/etcd.log" 2>&1 &
  echo "KVDN_ETCD_PID=$!" >>"$env"

  for ((i = 1; i <= nodes; i++)); do
    local ns="${prefix}n$i" ip="$net.$((10 + i))" nd="$dir/node$i"
    ip netns add "$ns"
    ip link add "${prefix}h$i" type veth peer name "${prefix}c$i"
    ip link set "${prefix}c$i" netns "$ns"
    ip netns exec "$ns" ip link set "${prefix}c$i" name eth0
    ip netns exec "$ns" ip addr add "$ip/24" dev eth0
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip link set eth0 up
    ip netns exec "$ns" ip route add default via "$net.1"
    ip link set "${prefix}h$i" master "${prefix}br"
    ip link set "${prefix}h$i" up
    rm -rf "$nd"
    mkdir -p "$nd"
    {
      echo "KVDN_NODE${i}_NAME=node$i"
      echo "KVDN_NODE${i}_NS=$ns"
      echo "KVDN_NODE${i}_IP=$ip"
      echo "KVDN_NODE${i}_GRPC=$ip:7070"
      echo "KVDN_NODE${i}_HTTP=$ip:9470"
      echo "KVDN_NODE${i}_SOCKET=$nd/kvdnd.sock"
    } >>"$env"
  done

  for _ in $(seq 100); do
    etcdctl_ok=0
    (exec 3<>"/dev/tcp/$net.1/2379") 2>/dev/null && etcdctl_ok=1
    [[ $etcdctl_ok -eq 1 ]] && break
    sleep 0.1
  done
  [[ $etcdctl_ok -eq 1 ]] || die "etcd did not start; the end of its log:
$(tail -n 20 "$dir/etcd/etcd.log" 2>&1)"

  for ((i = 1; i <= nodes; i++)); do
    local ns="${prefix}n$i" ip="$net.$((10 + i))" nd="$dir/node$i"
    # exec: the pid recorded is kvdnd's own (kill -9 in the tests hits the daemon).
    ip netns exec "$ns" env UCX_NET_DEVICES=eth0 "$bin/kvdnd" --node-name "node$i" \
      --grpc-address "$ip:7070" --http-address "$ip:9470" --advertise-address "$ip:7070" \
      --unix-socket "$nd/kvdnd.sock" --data-dir "$nd/data" --host-tier-bytes "$((host_mib << 20))" \
      --data-plane-transports tcp --etcd "$net.1:2379" --cluster "$prefix" \
      --replicas "$replicas" --membership-ttl-ms "$ttl_ms" --peer-timeout-ms "$peer_timeout_ms" \
      --ready-file "$nd/ready.json" >"$nd/kvdnd.log" 2>&1 &
    echo "KVDN_NODE${i}_PID=$!" >>"$env"
  done

  # Ready: every node serving and seeing all the others.
  for ((i = 1; i <= nodes; i++)); do
    local ip="$net.$((10 + i))" seen=0
    for _ in $(seq 150); do
      seen=$("$bin/kvdnctl" --target "$ip:7070" --timeout 1 --json members 2>/dev/null |
        grep -o '"node"' | wc -l || true)
      [[ "$seen" -ge "$nodes" ]] && break
      sleep 0.2
    done
    # The teardown removes the log: its tail goes with the message.
    [[ "$seen" -ge "$nodes" ]] || die "node$i sees $seen of $nodes members; the end of its log:
$(tail -n 20 "$dir/node$i/kvdnd.log" 2>&1)"
  done
  trap - EXIT
  echo "cluster.sh: $nodes nodes up (replicas $replicas), etcd at $net.1:2379, state in $dir"
  for ((i = 1; i <= nodes; i++)); do
    echo "  node$i: $bin/kvdnctl --target $net.$((10 + i)):7070 members" \
      "  (inside: ip netns exec ${prefix}n$i ...; socket $dir/node$i/kvdnd.sock)"
  done
}

status() {
  local env="$dir/cluster.env"
  [[ -f "$env" ]] || { echo "cluster.sh: no cluster at $dir"; exit 1; }
  # shellcheck disable=SC1090
  source "$env"
  "$bin/kvdnctl" --target "$KVDN_NODE1_GRPC" members
}

case "$cmd" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: cluster.sh up|down|status [options] (see the top of this file)" >&2; exit 2 ;;
esac
