// Fuzzes the hand-written parsers of the chunk frames (proto/get_frames.h): kvdnd parses every
// client's PutRequest frames itself, and the client every GetResponse. Any byte string, cut into
// gRPC slices at points the input chooses, must be parsed or refused with the parser's error code
// (INVALID_ARGUMENT for PutRequest, INTERNAL for GetResponse); never crash, never hand out bytes
// from outside the message. Where protobuf also parses the bytes, the data handed out must be
// protobuf's `data` field.
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "kvdn/proto/get_frames.h"
#include "kvdn/v1/kv_service.pb.h"

namespace {

// The message after the first byte, cut into slices every (first byte % 7 + 1) * 3 bytes.
grpc::ByteBuffer Slices(const uint8_t* data, size_t size, std::string* whole) {
  const size_t step = size == 0 ? 1 : (data[0] % 7 + 1) * 3;
  const uint8_t* msg = size == 0 ? data : data + 1;
  const size_t n = size == 0 ? 0 : size - 1;
  whole->assign(reinterpret_cast<const char*>(msg), n);
  std::vector<grpc::Slice> slices;
  for (size_t at = 0; at < n; at += step) {
    slices.emplace_back(msg + at, std::min(step, n - at));
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

// The parsers hand out pieces of gRPC's slices (copies of the input): what they hand out cannot be
// longer than the message, and must be protobuf's data field where protobuf parses the message.
void CheckPut(const grpc::ByteBuffer& b, const std::string& whole) {
  std::string header, data;
  uint64_t data_len = 0;
  auto kind = kvdn::proto::ParsePutFrame(b, &header, &data_len, [&](const uint8_t* d, size_t n) {
    data.append(reinterpret_cast<const char*>(d), n);
  });
  if (!kind.ok()) {
    if (!absl::IsInvalidArgument(kind.status())) std::abort();
    return;
  }
  if (data.size() > whole.size() || header.size() > whole.size()) std::abort();
  kvdn::v1::PutRequest m;
  if (*kind == kvdn::proto::PutFrameKind::kData) {
    if (data.size() != data_len) std::abort();
    if (m.ParseFromString(whole) && m.data() != data) std::abort();
  }
}

void CheckGet(const grpc::ByteBuffer& b, const std::string& whole) {
  kvdn::proto::GetFrameFields fields;
  std::string data;
  absl::Status st = kvdn::proto::ParseGetFrame(b, &fields, [&](const uint8_t* d, size_t n) {
    data.append(reinterpret_cast<const char*>(d), n);
  });
  if (!st.ok()) {
    if (!absl::IsInternal(st)) std::abort();
    return;
  }
  if (data.size() > whole.size()) std::abort();
  kvdn::v1::GetResponse m;
  if (m.ParseFromString(whole) && m.data() != data) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string whole;
  const grpc::ByteBuffer b = Slices(data, size, &whole);
  CheckPut(b, whole);
  CheckGet(b, whole);
  return 0;
}
