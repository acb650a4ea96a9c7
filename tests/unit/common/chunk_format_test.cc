#include "kvdn/common/chunk_format.h"

#include <cstring>
#include <random>

#include "gtest/gtest.h"
#include "kvdn/common/hash.h"
#include "kvdn/testing/chunks.h"
#include "kvdn/testing/status_matchers.h"

namespace kvdn {
namespace {

using ::kvdn::testing::RandomChunk;
using ::kvdn::testing::StatusIs;
using ::testing::HasSubstr;

ChunkInfo Small() { return ChunkInfo{Dtype::kBFloat16, 3, 2, 16, 5}; }

void PutU32(std::vector<uint8_t>& b, size_t off, uint32_t v) { std::memcpy(&b[off], &v, 4); }
void PutU64(std::vector<uint8_t>& b, size_t off, uint64_t v) { std::memcpy(&b[off], &v, 8); }
// Recomputes the header checksum after a test edits header fields.
void Reseal(std::vector<uint8_t>& b) { PutU64(b, 56, Xxh3_64(ByteSpan(b.data(), 56))); }

TEST(ChunkFormatTest, RoundTripOnRandomShapes) {
  std::mt19937 rng(1);
  const Dtype dtypes[] = {Dtype::kFloat16, Dtype::kBFloat16, Dtype::kFloat32, Dtype::kFloat8E4M3};
  for (int i = 0; i < 200; ++i) {
    auto r = [&](uint32_t n) { return 1 + static_cast<uint32_t>(rng() % n); };
    const ChunkInfo info{dtypes[rng() % 4], r(40), r(8), r(256), r(64)};
    const auto payload = testing::RandomBytes(info.PayloadBytes(), i);
    ASSERT_OK_AND_ASSIGN(auto enc, EncodeChunk(info, payload));
    ASSERT_EQ(enc.size(), info.EncodedBytes());
    ASSERT_OK_AND_ASSIGN(ChunkView v, DecodeChunk(enc));
    EXPECT_EQ(v.header.info, info);
    EXPECT_EQ(v.header.payload_checksum, Xxh3_64(payload));
    ASSERT_EQ(v.payload.size(), payload.size());
    EXPECT_EQ(std::memcmp(v.payload.data(), payload.data(), payload.size()), 0);
    // Layer l is one contiguous range: K then V.
    const uint32_t l = rng() % info.num_layers;
    const ByteSpan layer = v.Layer(l);
    EXPECT_EQ(layer.size(), info.LayerBytes());
    EXPECT_EQ(std::memcmp(layer.data(), payload.data() + info.LayerBytes() * l, layer.size()), 0);
  }
}

TEST(ChunkFormatTest, LayerMajorOffsets) {
  const ChunkInfo info{Dtype::kBFloat16, 32, 8, 128, 256};  // Llama-3-8B, 256 tokens
  EXPECT_EQ(info.PayloadBytes(), 32u << 20);
  EXPECT_EQ(info.LayerBytes(), 1u << 20);
  EXPECT_EQ(info.HalfLayerBytes(), 512u << 10);
  EXPECT_EQ(info.LayerOffset(5), 5u << 20);
}

TEST(ChunkFormatTest, TruncatedBuffers) {
  const auto enc = RandomChunk(Small(), 1);
  EXPECT_THAT(DecodeChunk(ByteSpan(enc.data(), 10)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("truncated: 10 bytes")));
  EXPECT_THAT(DecodeChunk(ByteSpan(enc.data(), enc.size() - 1)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("truncated")));
  EXPECT_THAT(DecodeChunk(ByteSpan()), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(ChunkFormatTest, OversizedBuffersAndPayloads) {
  auto enc = RandomChunk(Small(), 2);
  enc.push_back(7);
  EXPECT_THAT(DecodeChunk(enc),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("1 trailing bytes")));
  // A header that declares a payload over the limit.
  auto big = RandomChunk(Small(), 3);
  PutU32(big, 8, 1024);    // layers
  PutU32(big, 12, 1024);   // heads
  PutU32(big, 16, 4096);   // head_dim
  PutU32(big, 20, 65536);  // tokens
  Reseal(big);
  EXPECT_THAT(DecodeChunk(big),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("oversized; the limit is")));
  const ChunkInfo too_big{Dtype::kFloat32, 1024, 1024, 4096, 65536};
  EXPECT_THAT(EncodeChunk(too_big, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("oversized")));
}

TEST(ChunkFormatTest, WrongMagicAndVersion) {
  auto enc = RandomChunk(Small(), 4);
  auto bad_magic = enc;
  bad_magic[0] = 'X';
  EXPECT_THAT(DecodeChunk(bad_magic),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("wrong magic")));
  auto bad_version = enc;
  bad_version[4] = 9;
  EXPECT_THAT(DecodeChunk(bad_version), StatusIs(absl::StatusCode::kInvalidArgument,
                                                 HasSubstr("version 9 is not supported")));
}

TEST(ChunkFormatTest, ChecksumMismatches) {
  auto enc = RandomChunk(Small(), 5);
  auto bad_payload = enc;
  bad_payload[kChunkHeaderBytes + 100] ^= 1;
  EXPECT_THAT(DecodeChunk(bad_payload),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("payload checksum mismatch")));
  EXPECT_OK(DecodeChunk(bad_payload, /*verify_payload=*/false));
  auto bad_header = enc;
  bad_header[9] ^= 1;  // num_layers changed without resealing
  EXPECT_THAT(DecodeChunk(bad_header),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("header checksum mismatch")));
}

TEST(ChunkFormatTest, InconsistentHeaderFields) {
  auto enc = RandomChunk(Small(), 6);
  auto bytes_off = enc;
  PutU64(bytes_off, 24, Small().PayloadBytes() + 2);
  Reseal(bytes_off);
  EXPECT_THAT(DecodeChunk(bytes_off),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("payload_bytes")));
  auto dtype = enc;
  dtype[6] = 0;
  Reseal(dtype);
  EXPECT_THAT(DecodeChunk(dtype), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dtype")));
  auto zero_layers = enc;
  PutU32(zero_layers, 8, 0);
  Reseal(zero_layers);
  EXPECT_THAT(DecodeChunk(zero_layers),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("num_layers is 0")));
  auto flags = enc;
  flags[7] = 1;
  Reseal(flags);
  EXPECT_THAT(DecodeChunk(flags), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("flags")));
  auto reserved = enc;
  reserved[44] = 1;
  Reseal(reserved);
  EXPECT_THAT(DecodeChunk(reserved),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("reserved byte 44")));
}

TEST(ChunkFormatTest, EncodeRejectsMismatchedSizes) {
  const auto payload = testing::RandomBytes(Small().PayloadBytes(), 7);
  EXPECT_THAT(EncodeChunk(Small(), ByteSpan(payload).subspan(1)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("shape needs")));
  std::vector<uint8_t> out(Small().EncodedBytes() + 1);
  EXPECT_THAT(EncodeChunk(Small(), payload, MutableByteSpan(out)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("output buffer")));
}

}  // namespace
}  // namespace kvdn
