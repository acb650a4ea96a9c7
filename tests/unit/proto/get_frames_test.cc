#include "kvdn/proto/get_frames.h"

#include <grpcpp/support/slice.h>

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kvdn/v1/kv_service.pb.h"

namespace kvdn::proto {
namespace {

std::string RandomString(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

// `bytes` as a ByteBuffer cut into slices at `cuts` (offsets), as gRPC's receive path may cut it.
grpc::ByteBuffer Cut(const std::string& bytes, std::vector<size_t> cuts) {
  cuts.push_back(bytes.size());
  std::vector<grpc::Slice> slices;
  size_t at = 0;
  for (size_t c : cuts) {
    c = std::min(c, bytes.size());
    if (c < at) continue;
    slices.emplace_back(bytes.data() + at, c - at);
    at = c;
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

struct Parsed {
  GetFrameFields fields;
  std::string data;
  absl::Status status;
};

Parsed Parse(const grpc::ByteBuffer& b) {
  Parsed p;
  p.status = ParseGetFrame(b, &p.fields, [&](const uint8_t* d, size_t n) {
    p.data.append(reinterpret_cast<const char*>(d), n);
  });
  return p;
}

std::string Encode(bool first, uint64_t size, v1::Tier tier, const std::string& data) {
  uint8_t h[kMaxGetFrameHeaderBytes];
  const size_t n = EncodeGetFrameHeader(first, size, tier, data.size(), h);
  return std::string(reinterpret_cast<char*>(h), n) + data;
}

TEST(GetFrames, OursParseAsProtobufAndBack) {
  for (size_t len : {0u, 1u, 127u, 128u, 16383u, 16384u, 1u << 20}) {
    for (bool first : {true, false}) {
      const std::string data = RandomString(len, static_cast<uint32_t>(len));
      const std::string wire = Encode(first, 5u << 20, v1::TIER_DISK, data);
      v1::GetResponse m;
      ASSERT_TRUE(m.ParseFromString(wire)) << len;
      EXPECT_EQ(m.data(), data);
      EXPECT_EQ(m.size(), first ? 5u << 20 : 0u);
      EXPECT_EQ(m.tier(), first ? v1::TIER_DISK : v1::TIER_UNSPECIFIED);
      // Protobuf's own serialization (fields in number order: tier after data) parses back.
      const Parsed p = Parse(Cut(m.SerializeAsString(), {3}));
      ASSERT_TRUE(p.status.ok()) << p.status;
      EXPECT_TRUE(p.data == data);
      EXPECT_EQ(p.fields.size, m.size());
      EXPECT_EQ(p.fields.tier, m.tier());
    }
  }
}

TEST(GetFrames, ParsesProtobufSerializationCutAnywhere) {
  v1::GetResponse m;
  m.set_size(1234567);
  m.set_tier(v1::TIER_HOST);
  m.set_data(RandomString(3000, 7));
  const std::string wire = m.SerializeAsString();
  std::mt19937 rng(1);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<size_t> cuts;
    for (int i = 0; i < trial % 7; ++i) cuts.push_back(rng() % (wire.size() + 1));
    std::sort(cuts.begin(), cuts.end());
    const Parsed p = Parse(Cut(wire, cuts));
    ASSERT_TRUE(p.status.ok()) << p.status;
    EXPECT_TRUE(p.fields.has_size);
    EXPECT_EQ(p.fields.size, 1234567u);
    EXPECT_EQ(p.fields.tier, v1::TIER_HOST);
    ASSERT_EQ(p.data, m.data());
  }
}

TEST(GetFrames, SkipsUnknownFields) {
  // Field 9 as varint, field 10 as bytes, field 11 fixed64, field 12 fixed32, then data.
  std::string wire;
  wire += std::string("\x48\x05", 2);
  wire += std::string("\x52\x03xyz", 5);
  wire += std::string("\x59", 1) + std::string(8, 'a');
  wire += std::string("\x65", 1) + std::string(4, 'b');
  wire += Encode(false, 0, v1::TIER_UNSPECIFIED, "payload");
  const Parsed p = Parse(Cut(wire, {1, 3, 9}));
  ASSERT_TRUE(p.status.ok()) << p.status;
  EXPECT_EQ(p.data, "payload");
  EXPECT_FALSE(p.fields.has_size);
}

TEST(GetFrames, MalformedMessagesAreInternalErrorsNamingTheFault) {
  const std::string good = Encode(true, 100, v1::TIER_HOST, std::string(100, 'x'));
  struct Case {
    std::string wire;
    std::string what;
  };
  const std::vector<Case> cases = {
      {good.substr(0, good.size() - 1), "data field runs past the message"},
      {good + Encode(false, 0, v1::TIER_UNSPECIFIED, "again"), "data field twice"},
      {std::string("\x08", 1), "truncated varint"},
      {std::string("\x80", 1), "truncated field tag"},
      {std::string("\x00\x01", 2), "field number 0"},
      {std::string("\x0b", 1), "wire type 3"},
      {std::string("\x09", 1) + std::string(8, '\0'), "field 1 with wire type 1"},
      {std::string("\x10\x05", 2), "data field with wire type 0"},
      {std::string("\x1a\x05", 2), "field runs past the message"},
  };
  for (const Case& c : cases) {
    const Parsed p = Parse(Cut(c.wire, {}));
    EXPECT_EQ(p.status.code(), absl::StatusCode::kInternal) << c.what;
    EXPECT_NE(p.status.message().find(c.what), std::string::npos)
        << "want \"" << c.what << "\", got " << p.status;
  }
}

}  // namespace
}  // namespace kvdn::proto
