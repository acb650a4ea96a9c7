// Byte spans used across module boundaries.
#ifndef KVDN_COMMON_BYTES_H_
#define KVDN_COMMON_BYTES_H_

#include <cstdint>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace kvdn {

using ByteSpan = absl::Span<const uint8_t>;
using MutableByteSpan = absl::Span<uint8_t>;

// The bytes of a string (a protobuf `bytes` field, a std::string buffer).
inline ByteSpan AsBytes(absl::string_view s) {
  return ByteSpan(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

// Little-endian integers in byte buffers, whatever the host's byte order (every kvdn wire and disk
// layout is little-endian unless it says otherwise).
template <typename T>
void StoreLe(uint8_t* p, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
template <typename T>
T LoadLe(const uint8_t* p) {
  T v = 0;
  for (size_t i = sizeof(T); i-- > 0;) v = static_cast<T>((v << 8) | p[i]);
  return v;
}

}  // namespace kvdn

#endif  // KVDN_COMMON_BYTES_H_
