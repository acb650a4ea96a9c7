// Byte spans used across module boundaries.
#ifndef KVDN_COMMON_BYTES_H_
#define KVDN_COMMON_BYTES_H_

#include <cstdint>

#include "absl/types/span.h"

namespace kvdn {

using ByteSpan = absl::Span<const uint8_t>;
using MutableByteSpan = absl::Span<uint8_t>;

}  // namespace kvdn

#endif  // KVDN_COMMON_BYTES_H_
