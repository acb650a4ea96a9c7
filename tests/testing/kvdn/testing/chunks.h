// Test helpers: random chunks, keys and temporary directories.
#ifndef KVDN_TESTING_CHUNKS_H_
#define KVDN_TESTING_CHUNKS_H_

#include <stdlib.h>

#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "kvdn/common/chunk_format.h"
#include "kvdn/common/chunk_key.h"

namespace kvdn::testing {

// Random, never all-zero bytes.
inline std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> out(n);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint64_t v = rng() | 1;
    for (int b = 0; b < 8; ++b) out[i + b] = static_cast<uint8_t>(v >> (8 * b));
  }
  for (; i < n; ++i) out[i] = static_cast<uint8_t>(rng() | 1);
  return out;
}

// `n` token ids derived from `seed` (a Llama-3-sized vocabulary).
inline std::vector<int32_t> RandomTokens(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % 128000);
  return t;
}

// A chunk shape whose encoded size is close to `approx_bytes` (bf16, 8 kv heads, head_dim 128).
inline ChunkInfo InfoForBytes(uint64_t approx_bytes, uint32_t layers = 4) {
  ChunkInfo info{Dtype::kBFloat16, layers, 8, 128, 1};
  const uint64_t per_token = info.PayloadBytes();
  info.num_tokens = static_cast<uint32_t>(std::max<uint64_t>(1, approx_bytes / per_token));
  return info;
}

// An encoded chunk of shape `info` with a random payload derived from `seed`.
inline std::vector<uint8_t> RandomChunk(const ChunkInfo& info, uint64_t seed) {
  auto payload = RandomBytes(info.PayloadBytes(), seed);
  return EncodeChunk(info, payload).value();
}

// A key in namespace `ns` whose prefix hash is derived from `seed`.
inline ChunkKey KeyFor(uint64_t seed, std::string ns = "test") {
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + 1);
  return ChunkKey{std::move(ns), 0x1234abcd5678ef90ull, Hash128{rng(), rng()}};
}

// A fresh directory under TMPDIR, removed with everything in it on destruction.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "kvdn-test-XXXXXX").string();
    path_ = mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

}  // namespace kvdn::testing

#endif  // KVDN_TESTING_CHUNKS_H_
