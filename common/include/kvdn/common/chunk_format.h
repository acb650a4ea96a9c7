// The chunk format: how one chunk of KV is laid out in memory, on disk and on the wire.
//
//   [ header: 64 bytes, little-endian ][ payload: payload_bytes ]
//
//   offset size field
//        0    4 magic            "KVDN" (bytes 4B 56 44 4E)
//        4    2 version          kChunkFormatVersion
//        6    1 dtype            Dtype code
//        7    1 flags            0 (reserved)
//        8    4 num_layers
//       12    4 num_kv_heads
//       16    4 head_dim
//       20    4 num_tokens       <= tokens_per_chunk; a tail chunk holds fewer
//       24    8 payload_bytes    = 2 * num_layers * num_tokens * num_kv_heads * head_dim * dtype
//       size 32    8 payload_checksum XXH3-64 (seed 0) of the payload 40   16 reserved         zero
//       56    8 header_checksum  XXH3-64 (seed 0) of bytes [0, 56)
//
// The payload is layer-major: [layer][K|V][token][kv_head][dim], so one layer (its K then its V) is
// one contiguous byte range and layer-wise streaming reads a range, never the whole chunk.
#ifndef KVDN_COMMON_CHUNK_FORMAT_H_
#define KVDN_COMMON_CHUNK_FORMAT_H_

#include <cstdint>
#include <vector>

#include "kvdn/common/bytes.h"
#include "kvdn/common/chunk_key.h"
#include "kvdn/common/status.h"

namespace kvdn {

inline constexpr uint32_t kChunkMagic = 0x4E44564B;  // "KVDN" in file byte order
inline constexpr uint16_t kChunkFormatVersion = 1;
inline constexpr size_t kChunkHeaderBytes = 64;
inline constexpr uint32_t kMaxChunkLayers = 1024;
inline constexpr uint32_t kMaxChunkKvHeads = 1024;
inline constexpr uint32_t kMaxChunkHeadDim = 4096;
inline constexpr uint32_t kMaxChunkTokens = 65536;
inline constexpr uint64_t kMaxChunkPayloadBytes = uint64_t{1} << 30;  // 1 GiB

// Shape of one chunk's KV.
struct ChunkInfo {
  Dtype dtype = Dtype::kBFloat16;
  uint32_t num_layers = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t num_tokens = 0;

  // INVALID_ARGUMENT naming the field out of range, or the payload being over
  // kMaxChunkPayloadBytes.
  absl::Status Validate() const;
  uint64_t PayloadBytes() const;
  // Bytes of one layer (K and V) and of one of its K or V halves.
  uint64_t LayerBytes() const;
  uint64_t HalfLayerBytes() const { return LayerBytes() / 2; }
  // Offset of layer `l`'s K block within the payload; its V block follows at + HalfLayerBytes().
  uint64_t LayerOffset(uint32_t l) const { return LayerBytes() * l; }
  uint64_t EncodedBytes() const { return kChunkHeaderBytes + PayloadBytes(); }

  friend bool operator==(const ChunkInfo&, const ChunkInfo&) = default;
};

struct ChunkHeader {
  ChunkInfo info;
  uint64_t payload_bytes = 0;
  uint64_t payload_checksum = 0;
};

// A decoded chunk: views into the caller's buffer, valid while it is.
struct ChunkView {
  ChunkHeader header;
  ByteSpan payload;
  // Layer `l` (K then V). REQUIRES: l < header.info.num_layers.
  ByteSpan Layer(uint32_t l) const {
    return payload.subspan(header.info.LayerOffset(l), header.info.LayerBytes());
  }
};

// Writes the 64-byte header for `info` and a payload with checksum `payload_checksum`.
// REQUIRES: info.Validate().ok(); out.size() >= kChunkHeaderBytes.
void WriteChunkHeader(const ChunkInfo& info, uint64_t payload_checksum, MutableByteSpan out);

// Encodes header + payload into `out`. INVALID_ARGUMENT if info is invalid, payload.size() differs
// from info.PayloadBytes(), or out.size() differs from info.EncodedBytes().
absl::Status EncodeChunk(const ChunkInfo& info, ByteSpan payload, MutableByteSpan out);
absl::StatusOr<std::vector<uint8_t>> EncodeChunk(const ChunkInfo& info, ByteSpan payload);

// Decodes and checks the header only (magic, version, header checksum, field ranges, sizes).
// INVALID_ARGUMENT for a truncated header, wrong magic, wrong version, bad fields or an oversized
// payload; DATA_LOSS when the header checksum does not match.
absl::StatusOr<ChunkHeader> DecodeChunkHeader(ByteSpan data);

// Decodes a whole encoded chunk: the header as above, then INVALID_ARGUMENT if `data` is shorter
// (truncated) or longer (trailing bytes) than header + payload, then, when `verify_payload`,
// DATA_LOSS if the payload's XXH3-64 differs from the header's checksum.
absl::StatusOr<ChunkView> DecodeChunk(ByteSpan data, bool verify_payload = true);

}  // namespace kvdn

#endif  // KVDN_COMMON_CHUNK_FORMAT_H_
