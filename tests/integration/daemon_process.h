// A real kvdnd process for integration tests: its own temp data dir and unix socket, TCP and HTTP
// on port 0 (the ports picked are read from --ready-file), stopped with SIGTERM (or SIGKILL).
#ifndef KVDN_TESTS_INTEGRATION_DAEMON_PROCESS_H_
#define KVDN_TESTS_INTEGRATION_DAEMON_PROCESS_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace kvdn::testing {

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline int JsonInt(const std::string& json, const std::string& field) {
  const size_t at = json.find("\"" + field + "\": ");
  if (at == std::string::npos) return -1;
  return std::atoi(json.c_str() + at + field.size() + 4);
}

class DaemonProcess {
 public:
  // `dir` holds data, socket, ready file and log; reused across restarts.
  explicit DaemonProcess(std::string dir) : dir_(std::move(dir)) {}
  ~DaemonProcess() { Kill(); }

  // Starts kvdnd with the test defaults plus `extra` flags; waits until it serves. Returns false
  // (with the log in `error`) if it exits or does not get ready in 20 s.
  bool Start(const std::vector<std::string>& extra = {}, std::string* error = nullptr) {
    const std::string ready = dir_ + "/ready.json";
    std::filesystem::remove(ready);
    // $KVDN_KVDND names another binary (the GPU machine runs a packed copy, not the build's).
    const char* env = std::getenv("KVDN_KVDND");
    std::vector<std::string> args = {env != nullptr && *env != '\0' ? env : KVDN_KVDND_PATH,
                                     "--data-dir",
                                     dir_ + "/data",
                                     "--unix-socket",
                                     dir_ + "/kvdnd.sock",
                                     "--grpc-address",
                                     "127.0.0.1:0",
                                     "--http-address",
                                     "127.0.0.1:0",
                                     "--host-tier-bytes",
                                     "256MiB",
                                     "--disk-tier-bytes",
                                     "512MiB",
                                     "--ready-file",
                                     ready,
                                     "--log-level",
                                     "warn"};
    // A flag in `extra` replaces the default's (CLI11 refuses a flag given twice).
    for (size_t i = 1; i + 1 < args.size();) {
      if (std::find(extra.begin(), extra.end(), args[i]) != extra.end()) {
        args.erase(args.begin() + static_cast<std::ptrdiff_t>(i),
                   args.begin() + static_cast<std::ptrdiff_t>(i) + 2);
      } else {
        i += 2;
      }
    }
    args.insert(args.end(), extra.begin(), extra.end());
    args.insert(args.begin(), launcher_.begin(), launcher_.end());
    pid_ = fork();
    if (pid_ == 0) {
      FILE* log = std::fopen((dir_ + "/kvdnd.log").c_str(), "a");
      if (log) {
        dup2(fileno(log), 1);
        dup2(fileno(log), 2);
      }
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execvp(argv[0], argv.data());
      _exit(127);
    }
    for (int i = 0; i < 400; ++i) {
      const std::string json = ReadFile(ready);
      if (!json.empty()) {
        grpc_port_ = JsonInt(json, "grpc_port");
        http_port_ = JsonInt(json, "http_port");
        return true;
      }
      int status;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        exit_status_ = status;
        pid_ = -1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (error) *error = ReadFile(dir_ + "/kvdnd.log");
    Kill();
    return false;
  }

  // SIGTERM and wait; returns the exit status (0 = clean).
  int Stop() {
    if (pid_ <= 0) return exit_status_;
    kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return exit_status_;
  }
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  // A command (and its arguments) kvdnd is started under, e.g. {"unshare", "--pid", "--fork",
  // "--kill-child"}; it must end kvdnd when it is killed (Kill). Stop needs one that passes
  // SIGTERM on, which unshare does not.
  void set_launcher(std::vector<std::string> launcher) { launcher_ = std::move(launcher); }

  std::string unix_target() const { return "unix:" + dir_ + "/kvdnd.sock"; }
  std::string tcp_target() const { return absl::StrCat("127.0.0.1:", grpc_port_); }
  int http_port() const { return http_port_; }
  const std::string& dir() const { return dir_; }
  pid_t pid() const { return pid_; }  // -1 when not running
  std::string log() const { return ReadFile(dir_ + "/kvdnd.log"); }

 private:
  std::string dir_;
  std::vector<std::string> launcher_;
  pid_t pid_ = -1;
  int exit_status_ = -1;
  int grpc_port_ = 0;
  int http_port_ = 0;
};

// GET http://host:port/path (an IPv4 address); returns {status code, body}, {-1, ""} on a socket
// error.
inline std::pair<int, std::string> HttpGet(int port, const std::string& path,
                                           const std::string& host = "127.0.0.1") {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, host.c_str(), &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return {-1, ""};
  }
  const std::string req =
      "GET " + path + " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
  (void)!write(fd, req.data(), req.size());
  std::string resp;
  char buf[65536];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) resp.append(buf, n);
  close(fd);
  const size_t sp = resp.find(' ');
  const size_t body = resp.find("\r\n\r\n");
  if (sp == std::string::npos || body == std::string::npos) return {-1, resp};
  return {std::atoi(resp.c_str() + sp + 1), resp.substr(body + 4)};
}

// The value of one sample ("name{labels}") of the /metrics at host:port, -1 when absent.
inline double MetricSample(int port, const std::string& sample,
                           const std::string& host = "127.0.0.1") {
  auto [code, body] = HttpGet(port, "/metrics", host);
  const size_t at = body.find("\n" + sample + " ");
  if (code != 200 || at == std::string::npos) return -1;
  return std::atof(body.c_str() + at + sample.size() + 2);
}

// Runs a shell command; returns {exit code, stdout}. stderr goes to `err` when given.
inline std::pair<int, std::string> RunCommand(const std::string& cmd, std::string* err = nullptr) {
  const std::string err_file =
      std::filesystem::temp_directory_path() / ("kvdn-cmd-" + std::to_string(getpid()) + ".err");
  FILE* p = popen((cmd + " 2>" + err_file).c_str(), "r");
  std::string out;
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof(buf), p)) > 0;) out.append(buf, n);
  const int status = pclose(p);
  if (err) *err = ReadFile(err_file);
  std::filesystem::remove(err_file);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

}  // namespace kvdn::testing

#endif  // KVDN_TESTS_INTEGRATION_DAEMON_PROCESS_H_
