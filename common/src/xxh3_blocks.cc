// Xxh3_64Blocks: XXH3-64's long-input path (xxHash 0.8, whose output is frozen) split at its
// block boundaries. The algorithm, for an input of len > 240 bytes and the default 192-byte
// secret:
//   acc[8] = {P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1}
//   for each of the (len - 1) / 1024 whole blocks: accumulate its 16 stripes of 64 bytes (stripe
//     s with secret + 8s), then scramble acc (secret + 128)
//   accumulate the ((len - 1) % 1024) / 64 stripes after them, then the input's last 64 bytes
//     (secret + 121)
//   hash = avalanche(len * P64_1 + sum over i < 4 of fold64(acc[2i] ^ s[i], acc[2i+1] ^ s'[i]))
//     with s, s' the 16 bytes of secret + 11 + 16i
// accumulate of a stripe: for lane i, v = input word i, k = v ^ secret word i:
//   acc[i ^ 1] += v, acc[i] += lo32(k) * hi32(k)
// — additions only, so a block's 16 stripes add the same 8 words to acc whatever acc holds:
// those 8 words (the block's sum) are computed apart, in parallel, and folded in order.
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "kvdn/common/hash.h"

#define XXH_INLINE_ALL  // for XXH3_kSecret, the default secret, in this file only
#include <xxhash.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kvdn {
namespace {

constexpr uint64_t kStripe = 64;
constexpr uint64_t kStripesPerBlock = 16;
constexpr uint64_t kBlock = kStripe * kStripesPerBlock;
static_assert(kBlock == Xxh3_64Blocks::kBlockBytes);
constexpr uint64_t kP32_1 = 0x9E3779B1U, kP32_2 = 0x85EBCA77U, kP32_3 = 0xC2B2AE3DU;
constexpr uint64_t kP64_1 = 0x9E3779B185EBCA87ULL, kP64_2 = 0xC2B2AE3D27D4EB4FULL,
                   kP64_3 = 0x165667B19E3779F9ULL, kP64_4 = 0x85EBCA77C2B2AE63ULL,
                   kP64_5 = 0x27D4EB2F165667C5ULL;

inline uint64_t Read64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);  // little-endian hosts only (x86-64, aarch64)
  return v;
}

// Accumulates `stripes` stripes of `in` into acc, stripe s with secret + 8s.
inline void AccumulateScalar(uint64_t* acc, const uint8_t* in, uint64_t stripes,
                             const uint8_t* secret) {
  for (uint64_t s = 0; s < stripes; ++s) {
    for (int i = 0; i < 8; ++i) {
      const uint64_t v = Read64(in + s * kStripe + 8 * i);
      const uint64_t k = v ^ Read64(secret + s * 8 + 8 * i);
      acc[i ^ 1] += v;
      acc[i] += (k & 0xFFFFFFFFu) * (k >> 32);
    }
  }
}

#if defined(__x86_64__)
// The same for whole blocks, 16 stripes each, two 256-bit halves per stripe (xxHash's AVX2 path).
__attribute__((target("avx2"))) void BlockSumsAvx2(const uint8_t* in, uint64_t blocks,
                                                   const uint8_t* secret, uint64_t* sums) {
  for (uint64_t b = 0; b < blocks; ++b) {
    __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    const uint8_t* block = in + b * kBlock;
    for (uint64_t s = 0; s < kStripesPerBlock; ++s) {
      for (int h = 0; h < 2; ++h) {
        const __m256i v =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + s * kStripe + 32 * h));
        const __m256i key =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(secret + s * 8 + 32 * h));
        const __m256i k = _mm256_xor_si256(v, key);
        const __m256i k_hi = _mm256_srli_epi64(k, 32);
        const __m256i product = _mm256_mul_epu32(k, k_hi);  // lo32(k) * hi32(k) per lane
        const __m256i swapped = _mm256_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 3, 2));  // lane i ^ 1
        acc[h] = _mm256_add_epi64(acc[h], _mm256_add_epi64(product, swapped));
      }
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + 8 * b), acc[0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + 8 * b + 4), acc[1]);
  }
}
// GCC 12 warns about the intrinsics' own deliberately undefined vectors (avx512fintrin.h).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// One 512-bit register per stripe (xxHash's AVX-512 path).
__attribute__((target("avx512f"))) void BlockSumsAvx512(const uint8_t* in, uint64_t blocks,
                                                        const uint8_t* secret, uint64_t* sums) {
  for (uint64_t b = 0; b < blocks; ++b) {
    __m512i acc = _mm512_setzero_si512();
    const uint8_t* block = in + b * kBlock;
    for (uint64_t s = 0; s < kStripesPerBlock; ++s) {
      const __m512i v = _mm512_loadu_si512(block + s * kStripe);
      const __m512i k = _mm512_xor_si512(v, _mm512_loadu_si512(secret + s * 8));
      const __m512i product = _mm512_mul_epu32(k, _mm512_srli_epi64(k, 32));
      const __m512i swapped =
          _mm512_shuffle_epi32(v, static_cast<_MM_PERM_ENUM>(_MM_SHUFFLE(1, 0, 3, 2)));
      acc = _mm512_add_epi64(acc, _mm512_add_epi64(product, swapped));
    }
    _mm512_storeu_si512(sums + 8 * b, acc);
  }
}
#pragma GCC diagnostic pop
// Read at static initialization: __builtin_cpu_init first, as GCC asks of code that may run
// before libgcc's own initializer.
const bool kHaveAvx2 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") != 0;
}();
const bool kHaveAvx512 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") != 0;
}();
#endif

// The sums of `blocks` whole blocks from `in` into sums[8b .. 8b + 7].
void BlockSums(const uint8_t* in, uint64_t blocks, uint64_t* sums) {
#if defined(__x86_64__)
  if (kHaveAvx512) return BlockSumsAvx512(in, blocks, XXH3_kSecret, sums);
  if (kHaveAvx2) return BlockSumsAvx2(in, blocks, XXH3_kSecret, sums);
#endif
  for (uint64_t b = 0; b < blocks; ++b) {
    uint64_t* acc = sums + 8 * b;
    std::memset(acc, 0, 64);
    AccumulateScalar(acc, in + b * kBlock, kStripesPerBlock, XXH3_kSecret);
  }
}

__extension__ typedef unsigned __int128 Uint128;

inline uint64_t Fold64(uint64_t a, uint64_t b) {
  const Uint128 p = static_cast<Uint128>(a) * b;
  return static_cast<uint64_t>(p) ^ static_cast<uint64_t>(p >> 64);
}

// acc = scramble(acc + sum of block b), for b = 0 .. blocks - 1: the sequential part of XXH3,
// about 4 ns per 1 KiB block (scalar: 8 independent lanes; a 256-bit version, bound by its
// longer multiply chain, was slower).
void FoldBlocksScalar(uint64_t* acc, const uint64_t* sums, uint64_t blocks, const uint8_t* key) {
  uint64_t a[8], k[8];
  for (int i = 0; i < 8; ++i) {
    a[i] = acc[i];
    k[i] = Read64(key + 8 * i);
  }
  for (uint64_t b = 0; b < blocks; ++b) {
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      uint64_t x = a[i] + sums[8 * b + i];
      x ^= x >> 47;
      x ^= k[i];
      a[i] = x * kP32_1;
    }
  }
  for (int i = 0; i < 8; ++i) acc[i] = a[i];
}

// Buffers of finished Xxh3_64Blocks, kept for the next ones (at most kCachedBytes in all).
class BufferCache {
 public:
  static BufferCache& Get() {
    static BufferCache* cache = new BufferCache;  // never destroyed: used until exit
    return *cache;
  }
  // A buffer of at least `words` words (and words at most twice that), and its size.
  std::pair<uint64_t*, uint64_t> Take(uint64_t words) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].second >= words && free_[i].second <= 2 * words) {
          const auto found = free_[i];
          free_[i] = free_.back();
          free_.pop_back();
          cached_words_ -= found.second;
          return found;
        }
      }
    }
    return {new uint64_t[words], words};
  }
  void Give(uint64_t* buffer, uint64_t words) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if ((cached_words_ + words) * 8 <= kCachedBytes) {
        free_.emplace_back(buffer, words);
        cached_words_ += words;
        return;
      }
    }
    delete[] buffer;
  }

 private:
  static constexpr uint64_t kCachedBytes = 64 << 20;
  std::mutex mu_;
  std::vector<std::pair<uint64_t*, uint64_t>> free_;
  uint64_t cached_words_ = 0;
};

}  // namespace

struct Xxh3_64Blocks::Ranges {
  std::mutex mu;
  std::map<uint64_t, uint64_t> added;  // offset -> end
};

Xxh3_64Blocks::Xxh3_64Blocks(uint64_t input_bytes)
    : len_(input_bytes),
      blocks_(input_bytes > 240 ? (input_bytes - 1) / kBlock : 0),
      ranges_(std::make_unique<Ranges>()) {
  if (blocks_ == 0) return;
  std::tie(buffer_, buffer_words_) = BufferCache::Get().Take(9 * blocks_);
  sums_ = buffer_;
  summed_ = buffer_ + 8 * blocks_;
  std::memset(summed_, 0, blocks_ * 8);
}

Xxh3_64Blocks::~Xxh3_64Blocks() {
  if (buffer_ != nullptr) BufferCache::Get().Give(buffer_, buffer_words_);
}

bool Xxh3_64Blocks::AddRange(uint64_t offset, ByteSpan data) {
  const uint64_t end = offset + data.size();
  if (offset > len_ || data.size() > len_ - offset) return false;
  {
    std::lock_guard<std::mutex> lock(ranges_->mu);
    auto next = ranges_->added.lower_bound(offset);
    if (next != ranges_->added.end() && next->first < end) return false;
    if (next != ranges_->added.begin() && std::prev(next)->second > offset) return false;
    ranges_->added.emplace_hint(next, offset, end);
  }
  if (blocks_ == 0) return true;
  const uint64_t first = (offset + kBlock - 1) / kBlock;
  const uint64_t last = std::min(end / kBlock, blocks_);  // one past
  if (first >= last) return true;
  BlockSums(data.data() + (first * kBlock - offset), last - first, sums_ + 8 * first);
  for (uint64_t b = first; b < last; ++b) summed_[b] = 1;
  return true;
}

uint64_t Xxh3_64Blocks::Finish(ByteSpan input) {
  if (len_ <= 240 || input.size() != len_) return XXH3_64bits(input.data(), input.size());
  const uint8_t* secret = XXH3_kSecret;
  const uint8_t* in = input.data();
  uint64_t* sums = sums_;
  for (uint64_t b = 0; b < blocks_; ++b) {
    if (!summed_[b]) BlockSums(in + b * kBlock, 1, sums + 8 * b);
  }
  uint64_t acc[8] = {kP32_3, kP64_1, kP64_2, kP64_3, kP64_4, kP32_2, kP64_5, kP32_1};
  FoldBlocksScalar(acc, sums, blocks_, secret + (192 - kStripe));
  const uint64_t tail_stripes = ((len_ - 1) - blocks_ * kBlock) / kStripe;
  AccumulateScalar(acc, in + blocks_ * kBlock, tail_stripes, secret);
  AccumulateScalar(acc, in + len_ - kStripe, 1, secret + (192 - kStripe - 7));
  uint64_t h = len_ * kP64_1;
  for (int i = 0; i < 4; ++i) {
    h += Fold64(acc[2 * i] ^ Read64(secret + 11 + 16 * i),
                acc[2 * i + 1] ^ Read64(secret + 11 + 16 * i + 8));
  }
  h ^= h >> 37;
  h *= 0x165667919E3779F9ULL;
  return h ^ (h >> 32);
}

}  // namespace kvdn
