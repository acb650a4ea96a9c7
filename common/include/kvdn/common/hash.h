// The hash functions every kvdn client must agree on, in every language. All of them are XXH3
// (xxHash 0.8) with seed 0 over byte strings whose layout is written here; never a language's
// built-in hash. Golden vectors live in tests/unit/common/golden_test.cc.
#ifndef KVDN_COMMON_HASH_H_
#define KVDN_COMMON_HASH_H_

#include <array>
#include <compare>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/strings/string_view.h"
#include "kvdn/common/bytes.h"
#include "kvdn/common/status.h"

namespace kvdn {

// A 128-bit XXH3 value. Its canonical byte form (and its printable hex form) is big-endian: the 8
// bytes of `high` then the 8 bytes of `low`, as xxHash's XXH128_canonical_t.
struct Hash128 {
  uint64_t high = 0;
  uint64_t low = 0;

  std::array<uint8_t, 16> Canonical() const;
  std::string ToHex() const;  // 32 lowercase hex digits
  // REQUIRES nothing; returns INVALID_ARGUMENT unless `hex` is exactly 32 hex digits.
  static absl::StatusOr<Hash128> FromHex(absl::string_view hex);
  // From the 16-byte canonical (big-endian) form.
  static Hash128 FromCanonical(const uint8_t* bytes) {
    Hash128 h;
    for (int i = 0; i < 8; ++i) h.high = (h.high << 8) | bytes[i];
    for (int i = 8; i < 16; ++i) h.low = (h.low << 8) | bytes[i];
    return h;
  }

  friend bool operator==(const Hash128&, const Hash128&) = default;
  friend auto operator<=>(const Hash128&, const Hash128&) = default;
  template <typename H>
  friend H AbslHashValue(H h, const Hash128& v) {
    return H::combine(std::move(h), v.high, v.low);
  }
};

// Parses exactly `digits` (1..16) hex digits, either case, into an integer. INVALID_ARGUMENT naming
// `what` and the offending length or position otherwise.
absl::StatusOr<uint64_t> ParseHex(absl::string_view text, size_t digits, absl::string_view what);

// XXH3-64 (seed 0) of `data`. Uses the fastest SIMD path of the running CPU.
uint64_t Xxh3_64(ByteSpan data);
// XXH3-128 (seed 0) of `data`.
Hash128 Xxh3_128(ByteSpan data);

// Streaming XXH3-64 (seed 0); Digest() equals Xxh3_64 of everything passed to Update. Not
// thread-safe.
class Xxh3_64Stream {
 public:
  Xxh3_64Stream();
  ~Xxh3_64Stream();
  Xxh3_64Stream(const Xxh3_64Stream&) = delete;
  Xxh3_64Stream& operator=(const Xxh3_64Stream&) = delete;
  void Update(ByteSpan data);
  uint64_t Digest() const;

 private:
  void* state_;  // XXH3_state_t, kept out of this header
};

// XXH3-64 (seed 0) of one long input, computed in pieces on several threads, bit for bit
// Xxh3_64's value. XXH3 runs over 1 KiB blocks: each block's accumulation is a sum that does not
// depend on the blocks before it, and only the cheap scramble between blocks is sequential. So
// AddRange accumulates the blocks of a range (any thread, any order, while those bytes are still in
// its cache) and Finish folds the sums in order (a few ns per block) and hashes the tail. Inputs
// of at most 240 bytes are hashed whole by Finish.
class Xxh3_64Blocks {
 public:
  static constexpr uint64_t kBlockBytes = 1024;

  explicit Xxh3_64Blocks(uint64_t input_bytes);
  ~Xxh3_64Blocks();
  Xxh3_64Blocks(const Xxh3_64Blocks&) = delete;
  Xxh3_64Blocks& operator=(const Xxh3_64Blocks&) = delete;

  // Accumulates the blocks that lie wholly inside [offset, offset + data.size()) of the input;
  // `data` is those input bytes, final (a byte changed after is not seen). Thread-safe. A range
  // that overlaps one added before (or reaches past the input) adds nothing and returns false:
  // its blocks are left to Finish, and to the caller to decide what a second copy means.
  bool AddRange(uint64_t offset, ByteSpan data);
  // The hash of `input` (input_bytes long, every byte in place); blocks that no AddRange covered
  // are accumulated here. Not concurrently with AddRange.
  uint64_t Finish(ByteSpan input);

 private:
  const uint64_t len_;
  const uint64_t blocks_;  // blocks folded with a scramble: (len - 1) / 1 KiB
  // 8 words (the block's sum) then 1 (whether it is computed) per block, from a process-wide
  // cache of such buffers: a new one (256 KiB for a 4 MiB input) is a new mapping each time, and
  // faulting it in costs half as much as summing the blocks.
  uint64_t* buffer_ = nullptr;
  uint64_t buffer_words_ = 0;
  uint64_t* sums_ = nullptr;
  uint64_t* summed_ = nullptr;
  struct Ranges;  // the ranges added, disjoint, under a mutex (xxh3_blocks.cc)
  std::unique_ptr<Ranges> ranges_;
};

}  // namespace kvdn

#endif  // KVDN_COMMON_HASH_H_
