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
      {std::string("\x1a\x05", 2), "field 3 with wire type 2"},
      {std::string("\x22\x05", 2), "field runs past the message"},
  };
  for (const Case& c : cases) {
    const Parsed p = Parse(Cut(c.wire, {}));
    EXPECT_EQ(p.status.code(), absl::StatusCode::kInternal) << c.what;
    EXPECT_NE(p.status.message().find(c.what), std::string::npos)
        << "want \"" << c.what << "\", got " << p.status;
  }
}

struct ParsedPut {
  absl::StatusOr<PutFrameKind> kind;
  std::string header;
  uint64_t data_len = 0;
  uint64_t len_at_first_piece = 0;
  std::string data;
};

ParsedPut ParsePut(const grpc::ByteBuffer& b) {
  ParsedPut p;
  p.data_len = 12345;  // not touched unless a data field is seen
  p.kind = ParsePutFrame(b, &p.header, &p.data_len, [&](const uint8_t* d, size_t n) {
    if (p.data.empty()) p.len_at_first_piece = p.data_len;
    p.data.append(reinterpret_cast<const char*>(d), n);
  });
  return p;
}

TEST(PutFrames, ProtobufsOwnSerializationParsesCutAnywhere) {
  v1::PutRequest header;
  header.mutable_header()->mutable_key()->set_namespace_("tenant-a");
  header.mutable_header()->mutable_key()->set_prefix_hash(std::string(16, '\x5a'));
  header.mutable_header()->set_size(1u << 20);
  header.mutable_header()->set_payload_checksum(0x0123456789abcdefull);
  const std::string hw = header.SerializeAsString();
  for (size_t cut = 0; cut <= hw.size(); ++cut) {
    const ParsedPut p = ParsePut(Cut(hw, {cut}));
    ASSERT_TRUE(p.kind.ok()) << p.kind.status();
    EXPECT_EQ(*p.kind, PutFrameKind::kHeader);
    EXPECT_EQ(p.data_len, 12345u);
    v1::PutRequest::Header back;
    ASSERT_TRUE(back.ParseFromString(p.header));
    EXPECT_EQ(back.SerializeAsString(), header.header().SerializeAsString());
  }
  for (size_t len : {0u, 1u, 127u, 128u, 100000u}) {
    v1::PutRequest m;
    m.set_data(RandomString(len, static_cast<uint32_t>(len) + 3));
    const std::string w = m.SerializeAsString();
    for (std::vector<size_t> cuts :
         {std::vector<size_t>{}, {1}, {2}, {3}, {w.size() / 2}, {1, 5, 77, 5000, w.size() - 1}}) {
      const ParsedPut p = ParsePut(Cut(w, cuts));
      ASSERT_TRUE(p.kind.ok()) << p.kind.status();
      EXPECT_EQ(*p.kind, PutFrameKind::kData);
      EXPECT_EQ(p.data_len, len);
      if (len > 0) {
        EXPECT_EQ(p.len_at_first_piece, len);  // known before the first byte
      }
      EXPECT_TRUE(p.data == m.data()) << len;
    }
  }
  const ParsedPut empty = ParsePut(Cut("", {}));
  ASSERT_TRUE(empty.kind.ok());
  EXPECT_EQ(*empty.kind, PutFrameKind::kEmpty);
  // Unknown fields (a newer client) are skipped.
  const ParsedPut unknown = ParsePut(Cut(std::string("\x18\x07\x21", 3) + std::string(8, 'x') +
                                             v1::PutRequest().SerializeAsString() + "\x12\x02hi",
                                         {}));
  ASSERT_TRUE(unknown.kind.ok()) << unknown.kind.status();
  EXPECT_EQ(*unknown.kind, PutFrameKind::kData);
  EXPECT_EQ(unknown.data, "hi");
}

TEST(PutFrames, OurDataFramesParseAsProtobufAndBack) {
  for (size_t len : {0u, 1u, 127u, 128u, 16383u, 16384u, 1u << 20}) {
    const std::string data = RandomString(len, static_cast<uint32_t>(len) + 9);
    uint8_t h[kMaxPutFrameHeaderBytes];
    const std::string wire =
        std::string(reinterpret_cast<char*>(h), EncodePutDataFrameHeader(len, h)) + data;
    v1::PutRequest m;
    ASSERT_TRUE(m.ParseFromString(wire)) << len;
    EXPECT_EQ(m.frame_case(), v1::PutRequest::kData);
    EXPECT_TRUE(m.data() == data) << len;
    const ParsedPut p = ParsePut(Cut(wire, {1, 2}));
    ASSERT_TRUE(p.kind.ok()) << p.kind.status();
    EXPECT_EQ(*p.kind, PutFrameKind::kData);
    EXPECT_TRUE(p.data == data) << len;
  }
}

TEST(PutFrames, MalformedMessagesAreInvalidArgumentNamingTheFault) {
  v1::PutRequest h;
  h.mutable_header()->set_size(100);
  v1::PutRequest d;
  d.set_data(std::string(100, 'y'));
  const std::string hw = h.SerializeAsString();
  const std::string dw = d.SerializeAsString();
  struct Case {
    std::string wire;
    std::string what;
  };
  const std::vector<Case> cases = {
      {dw.substr(0, dw.size() - 1), "data runs past the message"},
      {hw.substr(0, hw.size() - 1), "header runs past the message"},
      {hw + dw, "not two fields"},
      {dw + dw, "not two fields"},
      {std::string("\x0a\x90\x40", 3) + std::string(8208, 'h'), "header of 8208 bytes"},
      {std::string("\x18", 1), "truncated varint"},
      {std::string("\x80", 1), "truncated field tag"},
      {std::string("\x00\x01", 2), "field number 0"},
      {std::string("\x0b", 1), "wire type 3"},
      {std::string("\x10\x05", 2), "field 2 with wire type 0"},
      {std::string("\x09", 1) + std::string(8, '\0'), "field 1 with wire type 1"},
      {std::string("\x1a\x05", 2), "field runs past the message"},
  };
  for (const Case& c : cases) {
    const ParsedPut p = ParsePut(Cut(c.wire, {}));
    ASSERT_FALSE(p.kind.ok()) << c.what;
    EXPECT_EQ(p.kind.status().code(), absl::StatusCode::kInvalidArgument) << c.what;
    EXPECT_NE(p.kind.status().message().find(c.what), std::string::npos)
        << "want \"" << c.what << "\", got " << p.kind.status();
  }
}

}  // namespace
}  // namespace kvdn::proto
