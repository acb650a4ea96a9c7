#include "kvdn/daemon/placement.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "kvdn/common/hash.h"

namespace kvdn::daemon {
namespace {

// splitmix64's finalizer: spreads the XOR of two hashes over all 64 bits.
uint64_t Mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t KeyHash(const ChunkKey& key) {
  std::array<uint8_t, 24> bytes;
  const std::array<uint8_t, 16> h = key.prefix_hash.Canonical();
  std::memcpy(bytes.data(), h.data(), h.size());
  for (int i = 0; i < 8; ++i) bytes[16 + i] = static_cast<uint8_t>(key.fingerprint >> (8 * i));
  return Xxh3_64(ByteSpan(bytes.data(), bytes.size()));
}

}  // namespace

Placement::Placement(std::vector<std::string> members) : members_(std::move(members)) {
  std::sort(members_.begin(), members_.end());
  members_.erase(std::unique(members_.begin(), members_.end()), members_.end());
  node_hash_.reserve(members_.size());
  for (const std::string& m : members_) {
    node_hash_.push_back(Xxh3_64(ByteSpan(reinterpret_cast<const uint8_t*>(m.data()), m.size())));
  }
}

std::vector<std::string> Placement::Owners(const ChunkKey& key, size_t replicas) const {
  const size_t n = std::min(replicas, members_.size());
  if (n == 0) return {};
  const uint64_t k = KeyHash(key);
  std::vector<std::pair<uint64_t, size_t>> w(members_.size());
  for (size_t i = 0; i < members_.size(); ++i) w[i] = {Mix(k ^ node_hash_[i]), i};
  // Highest weight first; equal weights by member order (names are sorted).
  auto better = [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  };
  std::partial_sort(w.begin(), w.begin() + static_cast<std::ptrdiff_t>(n), w.end(), better);
  std::vector<std::string> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(members_[w[i].second]);
  return out;
}

}  // namespace kvdn::daemon
