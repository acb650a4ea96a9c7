#!/usr/bin/env python3
"""Checks deploy/ against the real binaries (ctest label `unit`; tests/deploy/CMakeLists.txt).

  check_deploy.py REPO KVDND KVDNCTL

- Kubernetes manifests (deploy/k8s): every document parses and names itself; selectors match
  the pod labels; every volume mount, probe port, Service targetPort and ServiceMonitor port
  names something that exists; kustomizations list files that exist.
- kvdnd's config in the ConfigMap plus the DaemonSet's args (its $(VAR)s filled in) pass
  `kvdnd --print-config`; the effective config listens on the container ports, keeps its socket
  and data under hostPath mounts, points at the etcd Service, and fits the memory limit.
- etcd: --initial-cluster names every StatefulSet replica under the headless Service.
- Prometheus rules: the PrometheusRule holds exactly deploy/prometheus/kvdn-rules.yaml's groups;
  `promtool check rules` and `promtool test rules` pass.
- Every kvdn_* metric (and label) the rules and the Grafana dashboard use is exported by a live
  kvdnd that joined a cluster (etcd started here), with namespace shares on and a tenant's chunk
  written through the Python package; those exported only with a GPU tier are checked against
  kvdnd's source.
- The Dockerfile's runtime packages provide every shared library kvdnd and kvdnctl link.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
    return cond


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def quantity_bytes(q):
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"(\d+)([KMGT]i?)?", str(q))
    if not m:
        raise ValueError(f"unsupported quantity {q!r}")
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


def check_manifests(repo):
    k8s = os.path.join(repo, "deploy/k8s")
    objects = {}
    for sub in ["", "monitoring"]:
        kust = load_docs(os.path.join(k8s, sub, "kustomization.yaml"))[0]
        for res in kust["resources"]:
            path = os.path.join(k8s, sub, res)
            if not check(os.path.isfile(path), f"{sub or '.'}/kustomization.yaml lists missing {res}"):
                continue
            for d in load_docs(path):
                name = d.get("metadata", {}).get("name")
                ok = check(d.get("apiVersion") and d.get("kind") and name,
                           f"{res}: a document without apiVersion, kind or metadata.name")
                if ok:
                    objects[(d["kind"], name)] = d
    # The image tag the kustomization deploys is the version the build stamps into kvdnd.
    version = re.search(r"project\(kvdn VERSION (\S+)", open(os.path.join(repo, "CMakeLists.txt")).read())
    tags = {i["name"]: i.get("newTag") for i in load_docs(os.path.join(k8s, "kustomization.yaml"))[0].get("images", [])}
    check(version and tags.get("kvdn/kvdnd") == version.group(1),
          f"kustomization deploys kvdn/kvdnd:{tags.get('kvdn/kvdnd')}, the project is {version and version.group(1)}")
    for path in [os.path.join(k8s, "examples", f) for f in os.listdir(os.path.join(k8s, "examples"))]:
        for d in load_docs(path):
            check(d.get("apiVersion") and d.get("kind"), f"{path}: no apiVersion or kind")

    def labels_match(selector, labels):
        return all(labels.get(k) == v for k, v in selector.items())

    pods = {}
    for kind in ["DaemonSet", "StatefulSet"]:
        for (k, name), d in objects.items():
            if k != kind:
                continue
            tmpl = d["spec"]["template"]
            check(labels_match(d["spec"]["selector"]["matchLabels"], tmpl["metadata"]["labels"]),
                  f"{kind} {name}: selector does not match the pod template's labels")
            spec = tmpl["spec"]
            pods[name] = tmpl
            volumes = {v["name"] for v in spec.get("volumes", [])}
            volumes |= {c["metadata"]["name"] for c in d["spec"].get("volumeClaimTemplates", [])}
            for c in spec["containers"]:
                ports = {p["name"] for p in c.get("ports", [])}
                for m in c.get("volumeMounts", []):
                    check(m["name"] in volumes, f"{name}/{c['name']}: mount {m['name']} has no volume")
                for probe in ["startupProbe", "livenessProbe", "readinessProbe"]:
                    port = c.get(probe, {}).get("httpGet", {}).get("port")
                    if port is not None:
                        check(port in ports or isinstance(port, int),
                              f"{name}/{c['name']}: {probe} port {port} is not a container port")
    for (k, name), d in objects.items():
        if k != "Service":
            continue
        sel = d["spec"]["selector"]
        targets = [t for t in pods.values() if labels_match(sel, t["metadata"]["labels"])]
        if not check(targets, f"Service {name}: selects no pod template"):
            continue
        names = {p["name"] for t in targets for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for p in d["spec"]["ports"]:
            tp = p.get("targetPort", p["name"])
            check(isinstance(tp, int) or tp in names, f"Service {name}: targetPort {tp} not a pod port")
    for (k, name), d in objects.items():
        if k != "ServiceMonitor":
            continue
        services = [s for (sk, _), s in objects.items() if sk == "Service" and
                    labels_match(d["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
        ports = {p["name"] for s in services for p in s["spec"]["ports"]}
        for e in d["spec"]["endpoints"]:
            check(e["port"] in ports, f"ServiceMonitor {name}: port {e['port']} is on no selected Service")
    return objects


def check_etcd(objects):
    sts = objects[("StatefulSet", "kvdn-etcd")]
    args = " ".join(sts["spec"]["template"]["spec"]["containers"][0]["command"])
    m = re.search(r"--initial-cluster=(\S+)", args)
    members = dict(kv.split("=", 1) for kv in m.group(1).split(",")) if m else {}
    want = {f"kvdn-etcd-{i}" for i in range(sts["spec"]["replicas"])}
    check(set(members) == want, f"etcd --initial-cluster names {sorted(members)}, replicas are {sorted(want)}")
    svc = sts["spec"]["serviceName"]
    check(("Service", svc) in objects and objects[("Service", svc)]["spec"].get("clusterIP") == "None",
          f"etcd serviceName {svc} is not a headless Service here")
    for name, url in members.items():
        check(f"//{name}.{svc}." in url, f"etcd member {name} advertised at {url}, not under {svc}")


def check_daemon_config(objects, kvdnd, tmp):
    ds = objects[("DaemonSet", "kvdnd")]
    spec = ds["spec"]["template"]["spec"]
    c = spec["containers"][0]
    cm = objects[("ConfigMap", "kvdnd-config")]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    # The config file kvdnd is told to read must come from the ConfigMap's mount.
    args = list(c["args"])
    cfg_arg = next((a for a in args if a.startswith("--config=")), None)
    if not check(cfg_arg, "DaemonSet: kvdnd gets no --config"):
        return
    cfg_path = cfg_arg.split("=", 1)[1]
    mount_dir, key = os.path.dirname(cfg_path), os.path.basename(cfg_path)
    vol = volumes.get(mounts.get(mount_dir, ""), {})
    check(vol.get("configMap", {}).get("name") == "kvdnd-config" and key in cm["data"],
          f"DaemonSet: {cfg_path} is not key {key} of ConfigMap kvdnd-config")
    local_cfg = os.path.join(tmp, key)
    with open(local_cfg, "w") as f:
        f.write(cm["data"][key])
    # $(VAR)s as Kubernetes fills them in.
    samples = {"spec.nodeName": "gpu-node-7", "status.hostIP": "10.1.2.3"}
    env = {e["name"]: samples.get(e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath"), "x")
           for e in c.get("env", [])}
    real = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]
    check(not any("$(" in a for a in real), f"DaemonSet args use undefined variables: {real}")
    real = [f"--config={local_cfg}" if a == cfg_arg else a for a in real]
    p = subprocess.run([kvdnd, *real, "--print-config"], capture_output=True, text=True)
    if not check(p.returncode == 0, f"kvdnd refuses the DaemonSet's config: {p.stderr.strip()}"):
        return
    eff = json.loads(p.stdout)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check(eff["grpc_address"].endswith(f":{ports['grpc']}"), f"grpc_address {eff['grpc_address']} vs port {ports['grpc']}")
    check(eff["http_address"].endswith(f":{ports['http']}"), f"http_address {eff['http_address']} vs port {ports['http']}")
    check(eff["advertise_address"] == f"10.1.2.3:{ports['grpc']}", f"advertise_address {eff['advertise_address']}")
    check(eff["node_name"] == "gpu-node-7", f"node_name {eff['node_name']}")

    def host_path_for(path):
        for mp, vname in mounts.items():
            if path == mp or path.startswith(mp.rstrip("/") + "/"):
                return volumes[vname].get("hostPath")
        return None

    check(host_path_for(eff["data_dir"]), f"data_dir {eff['data_dir']} is not on a hostPath (a restart would lose the disk tier)")
    check(host_path_for(eff["unix_socket"]), f"unix_socket {eff['unix_socket']} is not on a hostPath engines can mount")
    for ep in eff["etcd_endpoints"]:
        host, port = ep.rsplit(":", 1)
        svc = host.split(".")[0]
        s = objects.get(("Service", svc))
        check(s and any(p["port"] == int(port) for p in s["spec"]["ports"]),
              f"etcd endpoint {ep}: no Service {svc} with port {port}")
    check(eff["etcd_endpoints"], "the DaemonSet's kvdnd joins no cluster (etcd_endpoints empty)")
    check(spec.get("dnsPolicy") == "ClusterFirstWithHostNet" or not spec.get("hostNetwork"),
          "hostNetwork without dnsPolicy ClusterFirstWithHostNet: etcd's Service name will not resolve")
    limit = quantity_bytes(c["resources"]["limits"]["memory"])
    check(quantity_bytes(c["resources"]["requests"]["memory"]) == limit,
          "kvdnd's memory request differs from its limit: it could be evicted while within its limit")
    need = int(eff["host_tier_bytes"]) + (1 << 30)
    check(limit >= need, f"memory limit {limit} < host tier {eff['host_tier_bytes']} + 1 GiB: OOM-killed at start")
    # Tenant tokens as deploy/README.md turns them on: the file it names lies on the mount of the
    # kvdn-tokens Secret, and kvdnd reads no file of it unless the config names one.
    tok = "/etc/kvdn-tokens/tokens"
    tvol = volumes.get(mounts.get(os.path.dirname(tok), ""), {})
    check(tvol.get("secret", {}).get("secretName") == "kvdn-tokens",
          f"{tok} (deploy/README.md) is not on a mount of the Secret kvdn-tokens")
    check(tvol.get("secret", {}).get("optional") is True,
          "the kvdn-tokens Secret volume is not optional: pods would not start without the Secret")
    check(not eff.get("auth_tokens_file") or host_path_for(eff["auth_tokens_file"]) is None,
          "auth_tokens_file lies on a hostPath, not on the Secret's mount")
    # TLS as deploy/README.md turns it on: its files on the kvdn-tls Secret's (optional) mount.
    tls_dir = "/etc/kvdn-tls"
    lvol = volumes.get(mounts.get(tls_dir, ""), {})
    check(lvol.get("secret", {}).get("secretName") == "kvdn-tls",
          f"{tls_dir} (deploy/README.md) is not a mount of the Secret kvdn-tls")
    check(lvol.get("secret", {}).get("optional") is True,
          "the kvdn-tls Secret volume is not optional: pods would not start without the Secret")
    for field in ("cert_file", "key_file", "ca_file"):
        path = eff.get("tls", {}).get(field)
        check(not path or os.path.dirname(path) == tls_dir,
              f"tls.{field} {path} is not on the kvdn-tls Secret's mount {tls_dir}")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    check(grace * 1000 > eff["drain_timeout_ms"], f"terminationGracePeriodSeconds {grace} < drain_timeout_ms")


def check_rules(repo, objects):
    rules_path = os.path.join(repo, "deploy/prometheus/kvdn-rules.yaml")
    rules = load_docs(rules_path)[0]
    pr = objects.get(("PrometheusRule", "kvdn"))
    check(pr and pr["spec"] == rules, "monitoring/prometheusrule.yaml differs from deploy/prometheus/kvdn-rules.yaml")
    for cmd in (["promtool", "check", "rules", rules_path],
                ["promtool", "test", "rules", os.path.join(repo, "deploy/prometheus/kvdn-rules.test.yaml")]):
        p = subprocess.run(cmd, capture_output=True, text=True)
        check(p.returncode == 0, f"{' '.join(cmd[:3])}: {p.stdout}{p.stderr}")
    return rules


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_chunks(target):
    """A tenant's chunks through the Python package (python/kvdn over $KVDN_C_LIBRARY), so the
    namespace gauges appear. Skipped, and said, without the library."""
    if not os.environ.get("KVDN_C_LIBRARY"):
        print("check_deploy: KVDN_C_LIBRARY unset: no chunks written; the namespace gauges are checked against the source")
        return
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
    import kvdn  # noqa: E402 (the repository's package, found above)

    # Ten 4 MiB chunks: past the namespace's 32 MiB host share, so some go to disk (both gauges).
    with kvdn.Client(kvdn.ModelSpec("check-deploy", 4, 8, 128, "bfloat16", tokens_per_chunk=256),
                     target=target, namespace="check-deploy") as c:
        tokens = list(range(2560))
        sizes = c.chunk_payload_sizes(len(tokens))
        stored = c.save(tokens, [bytes(n) for n in sizes]).chunks_stored
        check(stored == len(sizes), f"the check stored {stored} of {len(sizes)} chunks")


# Metrics kvdnd exports only with a GPU tier, which the check's kvdnd has not: their names must
# still be in kvdnd's source (a typo in a query is caught there).
GPU_ONLY = {"kvdn_namespace_gpu_bytes": {"namespace"}}  # name -> its labels


def live_metrics(kvdnd, kvdnctl, tmp):
    """name -> set of label names, from a kvdnd that joined a one-node cluster."""
    client, peer = free_port(), free_port()
    etcd = subprocess.Popen(
        ["etcd", "--data-dir", os.path.join(tmp, "etcd"), "--listen-client-urls", f"http://127.0.0.1:{client}",
         "--advertise-client-urls", f"http://127.0.0.1:{client}", "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready = os.path.join(tmp, "ready.json")
    log = open(os.path.join(tmp, "kvdnd.log"), "w")
    # Namespace shares on, so the per-namespace gauges exist once a tenant has written.
    config = os.path.join(tmp, "shares.json")
    with open(config, "w") as f:
        json.dump({"namespace_host_share": 0.5, "namespace_disk_share": 0.5}, f)
    daemon = subprocess.Popen(
        [kvdnd, "--data-dir", os.path.join(tmp, "data"), "--unix-socket", os.path.join(tmp, "kvdnd.sock"),
         "--grpc-address", "127.0.0.1:0", "--http-address", "127.0.0.1:0", "--host-tier-bytes", "64MiB",
         "--disk-tier-bytes", "128MiB", "--etcd", f"127.0.0.1:{client}", "--node-name", "check-deploy",
         "--config", config, "--ready-file", ready, "--log-level", "warn"], stdout=log, stderr=log)
    try:
        for _ in range(400):
            if os.path.exists(ready) or daemon.poll() is not None:
                break
            time.sleep(0.05)
        if not check(os.path.exists(ready), "kvdnd did not start: " + open(log.name).read()):
            return {}
        info = json.load(open(ready))
        # One gRPC call, so the per-method request counters exist.
        subprocess.run([kvdnctl, "--target", f"unix:{info['unix_socket']}", "stats"], capture_output=True)
        write_chunks(f"unix:{info['unix_socket']}")
        text = ""
        for _ in range(100):  # membership: the cluster gauges appear once joined
            text = urllib.request.urlopen(f"http://127.0.0.1:{info['http_port']}/metrics").read().decode()
            if "kvdn_cluster_members" in text and "kvdn_grpc_requests_total" in text:
                break
            time.sleep(0.1)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        etcd.kill()
        etcd.wait()
    names = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s", line)
        if m:
            labels = set(re.findall(r"(\w+)=\"", m.group(3) or ""))
            names.setdefault(m.group(1), set()).update(labels)
    return names


def check_queries(queries, exported, recorded):
    generic = {"instance", "job", "le", "__name__"}
    for where, q in queries:
        used = re.findall(r"\b(kvdn[_:][\w:]*)(?:\{([^}]*)\})?", q)
        by = set()
        for group in re.findall(r"\bby\s*\(([^)]*)\)", q):
            by |= {x.strip() for x in group.split(",") if x.strip()}
        metric_labels = set()
        for name, sel in used:
            if ":" in name:
                check(name in recorded, f"{where}: recording rule {name} is not defined")
                continue
            if name in GPU_ONLY:  # checked against the source in main()
                metric_labels |= GPU_ONLY[name]
                continue
            if not check(name in exported, f"{where}: kvdnd exports no {name}"):
                continue
            metric_labels |= exported[name]
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", sel or ""):
                check(label in exported[name] | generic, f"{where}: {name} has no label {label}")
        for label in by - generic:
            check(label in metric_labels, f"{where}: by ({label}) is no label of the metrics used")


def check_dockerfile(repo, binaries):
    text = open(os.path.join(repo, "deploy/docker/Dockerfile")).read()
    runtime = text.split("FROM debian:12-slim", 1)[1]
    install = re.search(r"apt-get install[^\n]*((?:\n[^\n]*\\)*\n[^\n]*)", runtime)
    listed = set(re.findall(r"\b(lib[\w.+-]+|ibverbs-providers)\b", install.group(0))) if install else set()
    base = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libbz2-1.0", "liblzma5", "libzstd1"}
    for b in binaries:
        out = subprocess.run(["ldd", b], capture_output=True, text=True).stdout
        for lib in re.findall(r"=>\s+(\S+)", out):
            owner = subprocess.run(["dpkg", "-S", os.path.realpath(lib)], capture_output=True, text=True)
            if owner.returncode != 0:
                owner = subprocess.run(["dpkg", "-S", lib], capture_output=True, text=True)
            if owner.returncode != 0:
                continue  # not from a package (a build tree library): installed with the binary
            pkg = owner.stdout.split(":", 1)[0]
            if re.match(r"lib(a|ub|t|l|hwa)san\d", pkg):
                continue  # a sanitizer build's runtime (scripts/test.sh asan); the image is not one
            check(pkg in listed | base, f"Dockerfile runtime stage lacks {pkg} (for {lib}, linked by {os.path.basename(b)})")


def main():
    repo, kvdnd, kvdnctl = sys.argv[1:4]
    objects = check_manifests(repo)
    check_etcd(objects)
    tmp = tempfile.mkdtemp(prefix="kvdn-deploy-")
    try:
        check_daemon_config(objects, kvdnd, tmp)
        rules = check_rules(repo, objects)
        recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
        queries = [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
        dash = json.load(open(os.path.join(repo, "deploy/grafana/kvdn-dashboard.json")))
        queries += [(f"dashboard panel '{p['title']}'", t["expr"]) for p in dash["panels"] for t in p["targets"]]
        for v in dash["templating"]["list"]:
            if isinstance(v.get("query"), dict):
                queries.append((f"dashboard variable {v['name']}", v["query"]["query"]))
        server_source = open(os.path.join(repo, "daemon/src/server.cc")).read()
        for name in GPU_ONLY:
            check(f'"{name}"' in server_source, f"{name} (GPU-only) is not exported by daemon/src/server.cc")
        exported = live_metrics(kvdnd, kvdnctl, tmp)
        if exported and not os.environ.get("KVDN_C_LIBRARY"):
            # No tenant wrote (a sanitizer build: python3 cannot load its libkvdn_c): the
            # per-namespace gauges are checked against the source as the GPU-only ones are.
            for name in ("kvdn_namespace_host_bytes", "kvdn_namespace_disk_bytes"):
                if check(f'"{name}"' in server_source, f"{name} is not exported by daemon/src/server.cc"):
                    exported.setdefault(name, {"namespace"})
        if exported:
            check_queries(queries, exported, recorded)
        check_dockerfile(repo, [kvdnd, kvdnctl])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for f in FAILURES:
        print("FAIL:", f)
    print(f"check_deploy: {len(FAILURES)} problem(s)")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
