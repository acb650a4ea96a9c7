// Fuzzes the chunk decoder. Any byte string must either decode to a view that lies inside the input
// and re-encodes to the same bytes, or be refused with INVALID_ARGUMENT or DATA_LOSS; never crash.
// Each input is also decoded once more with both checksums recomputed ("resealed"), so mutations
// reach the field checks behind the header checksum; a resealed buffer must never be DATA_LOSS.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kvdn/common/chunk_format.h"
#include "kvdn/common/hash.h"

namespace {

void Check(const uint8_t* data, size_t size, bool resealed) {
  const kvdn::ByteSpan in(data, size);
  auto view = kvdn::DecodeChunk(in, /*verify_payload=*/true);
  if (!view.ok()) {
    const bool allowed =
        absl::IsInvalidArgument(view.status()) || (!resealed && absl::IsDataLoss(view.status()));
    if (!allowed) std::abort();
    return;
  }
  if (view->payload.data() < data || view->payload.data() + view->payload.size() > data + size) {
    std::abort();
  }
  auto again = kvdn::EncodeChunk(view->header.info, view->payload);
  if (!again.ok() || again->size() != size || std::memcmp(again->data(), data, size) != 0) {
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Check(data, size, /*resealed=*/false);
  if (size >= kvdn::kChunkHeaderBytes) {
    std::vector<uint8_t> copy(data, data + size);
    const uint64_t payload = kvdn::Xxh3_64(kvdn::ByteSpan(copy).subspan(kvdn::kChunkHeaderBytes));
    std::memcpy(&copy[32], &payload, 8);  // little-endian hosts only, as the format
    const uint64_t header = kvdn::Xxh3_64(kvdn::ByteSpan(copy.data(), 56));
    std::memcpy(&copy[56], &header, 8);
    Check(copy.data(), copy.size(), /*resealed=*/true);
  }
  return 0;
}
