// A kvdn cluster in network namespaces, brought up and down by scripts/cluster.sh (one kvdnd per
// namespace, veth links to a bridge, one etcd on the bridge), for the cluster tests and
// bench/cluster. Needs root; Available() says whether this machine can.
#ifndef KVDN_TESTS_TESTING_KVDN_TESTING_NETNS_CLUSTER_H_
#define KVDN_TESTS_TESTING_KVDN_TESTING_NETNS_CLUSTER_H_

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace kvdn::testing {

struct NetnsClusterOptions {
  int nodes = 3;
  int replicas = 1;
  int ttl_ms = 3000;
  int peer_timeout_ms = 1000;
  int host_tier_mib = 256;
};

class NetnsCluster {
 public:
  // Root, iproute2 and a namespace that can be made: empty string; else why not.
  static std::string Unavailable() {
    if (geteuid() != 0) return "not root (network namespaces need it)";
    const std::string probe = absl::StrCat("kvdnprobe", getpid() % 100000);
    if (std::system(absl::StrCat("ip netns add ", probe, " >/dev/null 2>&1").c_str()) != 0) {
      return "ip netns add failed (no iproute2, or no CAP_SYS_ADMIN in this container)";
    }
    (void)std::system(absl::StrCat("ip netns del ", probe, " >/dev/null 2>&1").c_str());
    return "";
  }

  // Brings a cluster up under a fresh name and subnet (several may run at once). `script` is
  // scripts/cluster.sh, `bin` the directory of kvdnd and kvdnctl. Null with `*error` on failure.
  static std::unique_ptr<NetnsCluster> Up(const std::string& script, const std::string& bin,
                                          const NetnsClusterOptions& o, std::string* error) {
    static int serial = 0;
    std::unique_ptr<NetnsCluster> c(new NetnsCluster());
    c->script_ = script;
    c->bin_ = bin;
    // A name or subnet that is taken here (another test's cluster, or one a killed run left
    // behind: cluster.sh refuses those with exit status 3 before making anything) is skipped for
    // the next.
    for (int attempt = 0;; ++attempt) {
      const int id = (getpid() * 7 + serial++) % 9000;
      c->dir_ = absl::StrCat("/tmp/kvdn-netns-", getpid(), "-", serial);
      const std::string cmd = absl::StrCat(
          script, " up --dir ", c->dir_, " --prefix k", id, " --subnet ", 100 + id % 150,
          " --nodes ", o.nodes, " --replicas ", o.replicas, " --ttl-ms ", o.ttl_ms,
          " --peer-timeout-ms ", o.peer_timeout_ms, " --host-tier-mib ", o.host_tier_mib, " --bin ",
          bin, " > ", c->dir_, ".up.log 2>&1");
      const int rc = std::system(cmd.c_str());
      if (rc == 0) break;
      const std::string log = ReadAll(c->dir_ + ".up.log");
      std::remove((c->dir_ + ".up.log").c_str());
      const bool taken = WIFEXITED(rc) && WEXITSTATUS(rc) == 3;
      if (!taken || attempt == 7) {
        *error = absl::StrCat("scripts/cluster.sh up failed: ", log);
        return nullptr;
      }
    }
    std::ifstream env(c->dir_ + "/cluster.env");
    for (std::string line; std::getline(env, line);) {
      const size_t eq = line.find('=');
      if (eq != std::string::npos) c->env_[line.substr(0, eq)] = line.substr(eq + 1);
    }
    c->up_ = true;
    return c;
  }

  ~NetnsCluster() { Down(); }

  void Down() {
    if (!up_) return;
    up_ = false;
    (void)std::system(absl::StrCat(script_, " down --dir ", dir_, " >/dev/null 2>&1; rm -rf ", dir_,
                                   " ", dir_, ".up.log")
                          .c_str());
  }

  // Node i is 1-based, as the script names them (node1..nodeN).
  std::string Get(const std::string& key) const {
    auto it = env_.find(key);
    return it == env_.end() ? "" : it->second;
  }
  std::string Node(int i) const { return Get(absl::StrCat("KVDN_NODE", i, "_NAME")); }
  std::string Grpc(int i) const { return Get(absl::StrCat("KVDN_NODE", i, "_GRPC")); }
  std::string Ip(int i) const { return Get(absl::StrCat("KVDN_NODE", i, "_IP")); }
  std::string Namespace(int i) const { return Get(absl::StrCat("KVDN_NODE", i, "_NS")); }
  std::string Socket(int i) const { return Get(absl::StrCat("KVDN_NODE", i, "_SOCKET")); }
  // The root-side end of node i's veth (set it down to cut the node off).
  std::string HostVeth(int i) const { return absl::StrCat(Get("KVDN_PREFIX"), "h", i); }
  pid_t Pid(int i) const { return PidOf(absl::StrCat("KVDN_NODE", i, "_PID")); }
  pid_t EtcdPid() const { return PidOf("KVDN_ETCD_PID"); }
  const std::string& dir() const { return dir_; }

  bool Kill(int i) { return kill(Pid(i), SIGKILL) == 0; }
  bool KillEtcd() { return kill(EtcdPid(), SIGKILL) == 0; }
  bool SetLink(int i, bool up) {
    return std::system(absl::StrCat("ip link set ", HostVeth(i), up ? " up" : " down").c_str()) ==
           0;
  }
  std::string Log(int i) const { return ReadAll(absl::StrCat(dir_, "/node", i, "/kvdnd.log")); }

 private:
  NetnsCluster() = default;
  pid_t PidOf(const std::string& key) const {
    int pid = 0;
    return absl::SimpleAtoi(Get(key), &pid) ? pid : -1;
  }
  static std::string ReadAll(const std::string& path) {
    std::ifstream f(path);
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }

  std::string script_;
  std::string bin_;
  std::string dir_;
  std::map<std::string, std::string> env_;
  bool up_ = false;
};

}  // namespace kvdn::testing

#endif  // KVDN_TESTS_TESTING_KVDN_TESTING_NETNS_CLUSTER_H_
