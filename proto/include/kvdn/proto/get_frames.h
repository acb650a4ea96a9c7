// The wire form of kvdn.v1.GetResponse, written and read without copying the chunk bytes into a
// protobuf string: kvdnd sends each frame as a small header slice followed by a slice that points
// into its host arena, and the client copies the data straight from gRPC's receive slices into
// the caller's buffer. The bytes on the wire are exactly those of a GetResponse message, so any
// gRPC client that uses the generated stubs reads them as usual. Likewise for Put: the client
// sends each data frame as a small header slice and a slice over the caller's payload
// (EncodePutDataFrameHeader), and kvdnd reads the frames (ParsePutFrame) from gRPC's slices
// straight into the reservation.
#ifndef KVDN_PROTO_GET_FRAMES_H_
#define KVDN_PROTO_GET_FRAMES_H_

#include <grpcpp/support/byte_buffer.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvdn/v1/common.pb.h"

namespace kvdn::proto {

// Enough for every header EncodeGetFrameHeader writes.
inline constexpr size_t kMaxGetFrameHeaderBytes = 32;

// Writes the fields of a GetResponse that precede its data bytes into `out`: `size` and `tier`
// when `first` (the first message of a stream), then the data field's tag and length
// (`data_len`). The message is these bytes followed by the `data_len` data bytes. Returns the
// number of bytes written, at most kMaxGetFrameHeaderBytes.
size_t EncodeGetFrameHeader(bool first, uint64_t size, v1::Tier tier, size_t data_len,
                            uint8_t* out);

// What one GetResponse message held besides its data.
struct GetFrameFields {
  bool has_size = false;  // the size field was present (nonzero)
  uint64_t size = 0;
  int tier = 0;
};

// Parses one serialized GetResponse held in `message`, calling `on_data` with the pieces of its
// data field in order as they lie in gRPC's slices (the pointers are valid during the call only).
// Fields before the data field are in `fields` by the time on_data is first called when the
// sender wrote them first (kvdnd and the protobuf serializer both do: size is field 1). Unknown
// fields are skipped. INTERNAL when the message is not a well-formed GetResponse or holds its
// data field twice.
absl::Status ParseGetFrame(const grpc::ByteBuffer& message, GetFrameFields* fields,
                           absl::FunctionRef<void(const uint8_t* data, size_t n)> on_data);

// Enough for every header EncodePutDataFrameHeader writes.
inline constexpr size_t kMaxPutFrameHeaderBytes = 16;

// Writes the bytes of a PutRequest whose data field holds `data_len` bytes that precede those
// bytes (the field's tag and length) into `out`; the message is these bytes followed by the data.
// Returns the number written, at most kMaxPutFrameHeaderBytes.
size_t EncodePutDataFrameHeader(size_t data_len, uint8_t* out);

// What one PutRequest message was.
enum class PutFrameKind {
  kEmpty,   // neither field set
  kHeader,  // `header`: its serialized PutRequest.Header is in *header
  kData,    // `data`: its bytes went to on_data
};

// Parses one serialized PutRequest held in `message` (from a client, so malformed input is
// INVALID_ARGUMENT saying what was wrong): the header field's bytes are copied into `header`
// (for the caller to parse as a PutRequest.Header; the header is small), the data field's
// pieces are handed to `on_data` in order as they lie in gRPC's slices, with the field's whole
// length first in `data_len` (set before the first on_data call, so the caller can refuse an
// oversized frame before copying anything). Unknown fields are skipped. A message that holds both
// fields, or either field twice, is INVALID_ARGUMENT (kvdn's frames carry exactly one).
absl::StatusOr<PutFrameKind> ParsePutFrame(
    const grpc::ByteBuffer& message, std::string* header, uint64_t* data_len,
    absl::FunctionRef<void(const uint8_t* data, size_t n)> on_data);

}  // namespace kvdn::proto

#endif  // KVDN_PROTO_GET_FRAMES_H_
