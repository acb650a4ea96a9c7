// Fuzzes the chunk decoder: any byte string must either decode to a view that lies inside the input
// and re-encodes to the same bytes, or be refused with INVALID_ARGUMENT or DATA_LOSS. Never a
// crash.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kvdn/common/chunk_format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const kvdn::ByteSpan in(data, size);
  auto view = kvdn::DecodeChunk(in, /*verify_payload=*/true);
  if (!view.ok()) {
    if (!absl::IsInvalidArgument(view.status()) && !absl::IsDataLoss(view.status())) std::abort();
    return 0;
  }
  if (view->payload.data() < data || view->payload.data() + view->payload.size() > data + size) {
    std::abort();
  }
  auto again = kvdn::EncodeChunk(view->header.info, view->payload);
  if (!again.ok() || again->size() != size || std::memcmp(again->data(), data, size) != 0) {
    std::abort();
  }
  return 0;
}
