// kvdn_demo: the README's main job. Starts kvdnd on its embedded single-node default, drives a
// synthetic multi-turn chat + RAG workload through the SDK (requests share system prompts and
// documents; Llama-3-8B-shaped chunks — 8 KV heads x 128 dims, bf16, 256 tokens — with fewer
// layers so it runs on 2 cores), and reports the prefix hit rate, prefill tokens avoided, bytes
// served and load latency. Every loaded chunk is compared with the KV the "engine" would have
// computed, so the figures are of correct loads only. Stops the daemon with SIGTERM at the end.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kvdn/client/client.h"
#include "kvdn/common/chunk_key.h"
#include "kvdn/common/mutex.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Args {
  std::string kvdnd;
  int requests = 240;
  int workers = 2;
  uint32_t layers = 4;
  uint64_t seed = 1;
};

// The KV an engine would compute for chunk `c` of `tokens`: a deterministic function of the
// tokens up to the end of that chunk (stands in for the model's prefill).
void SynthesizeKv(absl::Span<const int32_t> tokens, size_t c, size_t tpc,
                  kvdn::MutableByteSpan out) {
  uint64_t s = 0x9E3779B97F4A7C15ull;
  const size_t end = std::min(tokens.size(), (c + 1) * tpc);
  for (size_t i = 0; i < end; ++i) s = (s ^ static_cast<uint32_t>(tokens[i])) * 0x100000001B3ull;
  uint64_t* w = reinterpret_cast<uint64_t*>(out.data());
  for (size_t i = 0; i < out.size() / 8; ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    w[i] = s;
  }
}

std::vector<int32_t> RandomTokens(std::mt19937_64& rng, size_t n) {
  std::uniform_int_distribution<int32_t> d(0, 128255);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = d(rng);
  return t;
}

struct Stats {
  kvdn::Mutex mu;
  uint64_t requests = 0, prompt_tokens = 0, hit_tokens = 0, bytes_loaded = 0, bytes_saved = 0;
  uint64_t requests_with_hit = 0;
  std::vector<double> load_ms;
  double load_seconds = 0;
};

void Progress(int done, int total) {
  const int width = 40;
  const int filled = total ? done * width / total : width;
  std::fprintf(stderr, "\r  [%s%s] %d/%d requests", std::string(filled, '#').c_str(),
               std::string(width - filled, '.').c_str(), done, total);
  if (done == total) std::fprintf(stderr, "\n");
}

pid_t StartDaemon(const Args& a, const std::string& ready) {
  pid_t pid = fork();
  if (pid == 0) {
    const std::string log = ready + ".log";
    FILE* f = std::fopen(log.c_str(), "w");
    if (f) {
      dup2(fileno(f), 1);
      dup2(fileno(f), 2);
    }
    execl(a.kvdnd.c_str(), "kvdnd", "--ready-file", ready.c_str(), static_cast<char*>(nullptr));
    std::perror("exec kvdnd");
    _exit(127);
  }
  return pid;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  std::string self = argv[0];
  a.kvdnd = self.substr(0, self.rfind('/') + 1) + "kvdnd";
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    auto val = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (s == "--kvdnd")
      a.kvdnd = val();
    else if (s == "--requests")
      a.requests = std::max(1, std::atoi(val().c_str()));
    else if (s == "--workers")
      a.workers = std::max(1, std::atoi(val().c_str()));
    else if (s == "--layers")
      a.layers = static_cast<uint32_t>(std::max(1, std::atoi(val().c_str())));
    else if (s == "--seed")
      a.seed = std::strtoull(val().c_str(), nullptr, 10);
    else {
      std::fprintf(stderr,
                   "usage: kvdn_demo [--kvdnd PATH] [--requests N] [--workers N] "
                   "[--layers N] [--seed N]\n");
      return 2;
    }
  }
  char tmpl[] = "/tmp/kvdn-demo.XXXXXX";
  if (!mkdtemp(tmpl)) {
    std::perror("mkdtemp");
    return 1;
  }
  const std::string ready = std::string(tmpl) + "/ready.json";
  std::printf("kvdn demo: starting kvdnd (embedded single-node default) ...\n");
  const pid_t daemon = StartDaemon(a, ready);
  std::string ready_json;
  for (int i = 0; i < 600 && ready_json.empty(); ++i) {
    std::ifstream in(ready);
    std::stringstream ss;
    ss << in.rdbuf();
    ready_json = ss.str();
    int status;
    if (ready_json.empty() && waitpid(daemon, &status, WNOHANG) == daemon) {
      std::fprintf(stderr, "kvdnd exited at start; its log (%s.log):\n", ready.c_str());
      std::ifstream log(ready + ".log");
      std::stringstream ls;
      ls << log.rdbuf();
      std::fprintf(stderr, "%s\n", ls.str().c_str());
      return 1;
    }
    if (ready_json.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const size_t sock_at = ready_json.find("\"unix_socket\": \"");
  if (sock_at == std::string::npos) {
    std::fprintf(stderr, "kvdnd did not become ready in 30 s\n");
    kill(daemon, SIGTERM);
    return 1;
  }
  const size_t from = sock_at + std::strlen("\"unix_socket\": \"");
  const std::string socket = ready_json.substr(from, ready_json.find('"', from) - from);
  std::printf("kvdnd ready (pid %d, unix:%s)\n", daemon, socket.c_str());

  kvdn::client::ClientOptions opts;
  opts.target = "unix:" + socket;
  opts.ns = "demo";  // fixed: a second run finds the first run's chunks (disk tier)
  opts.model = {"llama-3-8b-demo", a.layers, 8, 128, kvdn::Dtype::kBFloat16, 256};
  auto client = kvdn::client::Client::Connect(opts);
  if (!client.ok()) {
    std::fprintf(stderr, "%s\n", client.status().ToString().c_str());
    kill(daemon, SIGTERM);
    return 1;
  }
  const size_t tpc = opts.model.tokens_per_chunk;
  std::printf("model: %s-shaped, %u layers, 8 KV heads x 128, bf16, %zu tokens/chunk = %s/chunk\n",
              "Llama-3-8B", a.layers, tpc,
              absl::StrFormat("%.1f MiB", (*client)->PayloadBytes(tpc) / 1048576.0).c_str());

  // The shared content: system prompts and RAG documents.
  std::mt19937_64 rng(a.seed);
  std::vector<std::vector<int32_t>> systems, docs;
  for (int i = 0; i < 4; ++i) systems.push_back(RandomTokens(rng, 1024 + 256 * i));
  for (int i = 0; i < 12; ++i) docs.push_back(RandomTokens(rng, 1536 + 256 * (i % 4)));
  struct Session {
    std::vector<int32_t> history;
  };
  std::vector<Session> sessions(24);
  for (size_t i = 0; i < sessions.size(); ++i) sessions[i].history = systems[i % systems.size()];

  Stats stats;
  std::atomic<int> next{0}, done{0}, failures{0};
  kvdn::Mutex sessions_mu;
  auto worker = [&](int w) {
    std::mt19937_64 r(a.seed * 1000 + w);
    for (int i; (i = next.fetch_add(1)) < a.requests;) {
      std::vector<int32_t> prompt;
      if (i % 3 == 2) {  // RAG: a system prompt, two documents, a question
        prompt = systems[r() % systems.size()];
        for (int d = 0; d < 2; ++d) {
          const auto& doc = docs[r() % docs.size()];
          prompt.insert(prompt.end(), doc.begin(), doc.end());
        }
        auto q = RandomTokens(r, 64 + r() % 128);
        prompt.insert(prompt.end(), q.begin(), q.end());
      } else {  // chat: the next turn of a session
        kvdn::MutexLock lock(&sessions_mu);
        Session& s = sessions[r() % sessions.size()];
        auto turn = RandomTokens(r, 128 + r() % 384);
        s.history.insert(s.history.end(), turn.begin(), turn.end());
        if (s.history.size() > 12000) s.history.resize(systems[0].size());
        prompt = s.history;
      }
      const std::vector<uint64_t> sizes = (*client)->ChunkPayloadSizes(prompt.size());
      std::vector<std::vector<uint8_t>> kv(sizes.size());
      std::vector<kvdn::MutableByteSpan> bufs;
      for (size_t c = 0; c < sizes.size(); ++c) {
        kv[c].resize(sizes[c]);
        bufs.emplace_back(kv[c]);
      }
      const auto t0 = Clock::now();
      auto loaded = (*client)->Load(prompt, bufs);
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      if (!loaded.ok()) {
        std::fprintf(stderr, "\nload failed: %s\n", loaded.status().ToString().c_str());
        ++failures;
        continue;
      }
      // Verify what came back, then "prefill" the rest and save every full chunk.
      std::vector<uint8_t> expect;
      for (size_t c = 0; c < loaded->chunks; ++c) {
        expect.resize(sizes[c]);
        SynthesizeKv(prompt, c, tpc, kvdn::MutableByteSpan(expect));
        if (std::memcmp(expect.data(), kv[c].data(), sizes[c]) != 0) {
          std::fprintf(stderr, "\nchunk %zu of request %d differs from the computed KV\n", c, i);
          ++failures;
        }
      }
      for (size_t c = loaded->chunks; c < sizes.size(); ++c) {
        SynthesizeKv(prompt, c, tpc, bufs[c]);
      }
      const size_t full = prompt.size() / tpc;
      std::vector<kvdn::ByteSpan> payloads(bufs.begin(), bufs.begin() + full);
      auto saved = (*client)->Save(prompt, payloads);
      if (!saved.ok()) {
        std::fprintf(stderr, "\nsave failed: %s\n", saved.status().ToString().c_str());
        ++failures;
      }
      {
        kvdn::MutexLock lock(&stats.mu);
        ++stats.requests;
        stats.prompt_tokens += prompt.size();
        stats.hit_tokens += loaded->tokens;
        stats.requests_with_hit += loaded->tokens > 0;
        stats.bytes_loaded += loaded->bytes;
        if (saved.ok()) stats.bytes_saved += saved->bytes_sent;
        if (loaded->chunks > 0) {
          stats.load_ms.push_back(ms);
          stats.load_seconds += ms / 1000;
        }
      }
      Progress(++done, a.requests);
    }
  };
  std::printf(
      "workload: %d requests (chat turns over 24 sessions, RAG over 12 documents), %d "
      "concurrent clients\n",
      a.requests, a.workers);
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int w = 0; w < a.workers; ++w) threads.emplace_back(worker, w);
  for (auto& t : threads) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();

  std::printf("\n%-34s %s\n", "requests", absl::StrCat(stats.requests).c_str());
  std::printf("%-34s %.1f%% (%llu of %llu requests)\n", "requests with a prefix hit",
              100.0 * stats.requests_with_hit / std::max<uint64_t>(1, stats.requests),
              static_cast<unsigned long long>(stats.requests_with_hit),
              static_cast<unsigned long long>(stats.requests));
  std::printf("%-34s %.1f%% of %llu prompt tokens\n", "prefix hit rate (tokens)",
              100.0 * stats.hit_tokens / std::max<uint64_t>(1, stats.prompt_tokens),
              static_cast<unsigned long long>(stats.prompt_tokens));
  std::printf("%-34s %llu\n", "prefill tokens avoided",
              static_cast<unsigned long long>(stats.hit_tokens));
  std::printf("%-34s %.2f GB (saved %.2f GB)\n", "KV served by kvdn", stats.bytes_loaded / 1e9,
              stats.bytes_saved / 1e9);
  std::printf("%-34s %.2f GB/s per client while loading\n", "load throughput",
              stats.load_seconds > 0 ? stats.bytes_loaded / 1e9 / stats.load_seconds : 0.0);
  std::printf("%-34s p50 %.2f ms  p99 %.2f ms (requests with a hit)\n", "load latency",
              Percentile(stats.load_ms, 0.5), Percentile(stats.load_ms, 0.99));
  std::printf("%-34s %.1f s\n", "wall time", wall);
  std::printf("%-34s %d\n", "failures (load, verify, save)", failures.load());

  client->reset();
  std::printf("\nstopping kvdnd (SIGTERM) ...\n");
  kill(daemon, SIGTERM);
  int status = 0;
  waitpid(daemon, &status, 0);
  std::printf("kvdnd exited %s (log: %s.log)\n",
              WIFEXITED(status) && WEXITSTATUS(status) == 0 ? "cleanly" : "with an error",
              ready.c_str());
  return failures.load() == 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
