// A real etcd (Debian's etcd-server) for tests: one member in a temporary directory on free
// loopback ports, stopped with SIGTERM (or killed with Kill) at the end.
#ifndef KVDN_TESTS_CLUSTER_ETCD_PROCESS_H_
#define KVDN_TESTS_CLUSTER_ETCD_PROCESS_H_

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvdn/daemon/etcd_client.h"
#include "kvdn/testing/waiting.h"

namespace kvdn::testing {

// An etcd serving its client URL over TLS: its certificate and key, and with client_ca set,
// --client-cert-auth against that CA.
struct EtcdTls {
  std::string cert_file;
  std::string key_file;
  std::string client_ca;
};

class EtcdProcess {
 public:
  // `client_tls`: how the process itself asks etcd whether it is up (needed with `tls`).
  explicit EtcdProcess(std::string dir, std::optional<EtcdTls> tls = std::nullopt,
                       client::TlsOptions client_tls = {})
      : dir_(std::move(dir)), tls_(std::move(tls)), client_tls_(std::move(client_tls)) {}
  ~EtcdProcess() { Stop(); }

  // Starts etcd and waits until it answers (20 s). An etcd that exits at start (a restart on
  // ports another process holds for a moment) or does not answer (killed then) is started again,
  // up to 3 times in all. False with the reason and the end of etcd's log in `error` otherwise.
  bool Start(std::string* error) {
    for (int attempt = 0; attempt < 3; ++attempt) {
      if (attempt > 0) std::this_thread::sleep_for(std::chrono::seconds(1));
      const Started s = StartOnce();
      if (s == Started::kYes) return true;
      if (s == Started::kNoAnswer) Stop(SIGKILL);
    }
    if (error != nullptr) {
      *error = absl::StrCat("etcd did not start; the end of ", dir_, "/etcd.log:\n", LogTail());
    }
    return false;
  }
  void Stop(int sig = SIGTERM) {
    if (pid_ <= 0) return;
    kill(pid_, sig);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  std::string endpoint() const { return absl::StrCat("127.0.0.1:", client_port_); }

 private:
  enum class Started { kYes, kExited, kNoAnswer };

  // One start: kExited when etcd exits before it answers, kNoAnswer when it runs but does not
  // answer within 20 s (left running).
  Started StartOnce() {
    if (client_port_ == 0) {
      client_port_ = FreeLoopbackPort();
      peer_port_ = FreeLoopbackPort();
    }
    const std::string client = absl::StrCat(tls_ ? "https" : "http", "://127.0.0.1:", client_port_);
    const std::string peer = absl::StrCat("http://127.0.0.1:", peer_port_);
    std::vector<std::string> args = {"etcd",
                                     "--name=kvdn-test",
                                     "--data-dir=" + dir_ + "/etcd",
                                     "--listen-client-urls=" + client,
                                     "--advertise-client-urls=" + client,
                                     "--listen-peer-urls=" + peer,
                                     "--initial-advertise-peer-urls=" + peer,
                                     "--initial-cluster=kvdn-test=" + peer,
                                     "--log-level=error"};
    if (tls_) {
      args.push_back("--cert-file=" + tls_->cert_file);
      args.push_back("--key-file=" + tls_->key_file);
      if (!tls_->client_ca.empty()) {
        args.push_back("--client-cert-auth");
        args.push_back("--trusted-ca-file=" + tls_->client_ca);
      }
    }
    const std::string log = dir_ + "/etcd.log";
    pid_ = fork();
    if (pid_ == 0) {
      if (FILE* f = std::fopen(log.c_str(), "a")) {
        dup2(fileno(f), 1);
        dup2(fileno(f), 2);
      }
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execvp(argv[0], argv.data());
      std::fprintf(stderr, "cannot run etcd (install etcd-server: scripts/install-deps.sh)\n");
      _exit(127);
    }
    auto c = daemon::EtcdClient::Connect({.endpoints = {endpoint()}, .tls = client_tls_}).value();
    for (int i = 0; i < 200; ++i) {
      if (c->Get("/kvdn-test/ping").ok()) return Started::kYes;
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return Started::kExited;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return Started::kNoAnswer;
  }

  // The last 2000 bytes of etcd's log.
  std::string LogTail() const {
    std::string out;
    if (FILE* f = std::fopen((dir_ + "/etcd.log").c_str(), "r")) {
      char buf[4096];
      for (size_t n; (n = std::fread(buf, 1, sizeof(buf), f)) > 0;) out.append(buf, n);
      std::fclose(f);
    }
    return out.size() > 2000 ? out.substr(out.size() - 2000) : out;
  }

  std::string dir_;
  std::optional<EtcdTls> tls_;
  client::TlsOptions client_tls_;
  int client_port_ = 0;
  int peer_port_ = 0;
  pid_t pid_ = -1;
};

}  // namespace kvdn::testing

#endif  // KVDN_TESTS_CLUSTER_ETCD_PROCESS_H_
