#include "kvdn/common/hash.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

// libxxhash exports runtime-dispatched variants (SSE2/AVX2/AVX-512) on x86-64; the header below
// maps the plain names onto them.
#if defined(__x86_64__)
#include <xxh_x86dispatch.h>
#endif
#include <xxhash.h>

namespace kvdn {
namespace {

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

std::array<uint8_t, 16> Hash128::Canonical() const {
  std::array<uint8_t, 16> out;
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<uint8_t>(high >> (56 - 8 * i));
    out[8 + i] = static_cast<uint8_t>(low >> (56 - 8 * i));
  }
  return out;
}

absl::StatusOr<uint64_t> ParseHex(absl::string_view text, size_t digits, absl::string_view what) {
  if (text.size() != digits) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " must be ", digits, " hex digits, got ", text.size(), " characters"));
  }
  uint64_t v = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const int d = HexDigit(text[i]);
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " has a non-hex character at position ", i));
    }
    v = (v << 4) | static_cast<uint64_t>(d);
  }
  return v;
}

std::string Hash128::ToHex() const { return absl::StrFormat("%016x%016x", high, low); }

absl::StatusOr<Hash128> Hash128::FromHex(absl::string_view hex) {
  if (hex.size() != 32) {
    return absl::InvalidArgumentError(
        absl::StrCat("hash must be 32 hex digits, got ", hex.size(), " characters"));
  }
  Hash128 h;
  for (size_t i = 0; i < 32; ++i) {
    const int d = HexDigit(hex[i]);
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("hash has a non-hex character at position ", i));
    }
    uint64_t& word = i < 16 ? h.high : h.low;
    word = (word << 4) | static_cast<uint64_t>(d);
  }
  return h;
}

uint64_t Xxh3_64(ByteSpan data) { return XXH3_64bits(data.data(), data.size()); }

Hash128 Xxh3_128(ByteSpan data) {
  const XXH128_hash_t h = XXH3_128bits(data.data(), data.size());
  return Hash128{h.high64, h.low64};
}

Xxh3_64Stream::Xxh3_64Stream() : state_(XXH3_createState()) {
  XXH3_64bits_reset(static_cast<XXH3_state_t*>(state_));
}

Xxh3_64Stream::~Xxh3_64Stream() { XXH3_freeState(static_cast<XXH3_state_t*>(state_)); }

void Xxh3_64Stream::Update(ByteSpan data) {
  XXH3_64bits_update(static_cast<XXH3_state_t*>(state_), data.data(), data.size());
}

uint64_t Xxh3_64Stream::Digest() const {
  return XXH3_64bits_digest(static_cast<const XXH3_state_t*>(state_));
}

}  // namespace kvdn
