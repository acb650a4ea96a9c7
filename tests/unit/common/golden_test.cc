// Golden vectors: the hashes and bytes every kvdn client, in any language, must reproduce. The
// values were computed by make_golden.py with the reference `xxhsum` CLI, independently of this
// code.
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "gtest/gtest.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/common/chunk_key.h"
#include "kvdn/common/hash.h"

namespace kvdn {
namespace {

ByteSpan Bytes(const std::string& s) {
  return ByteSpan(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

TEST(GoldenTest, Xxh3) {
  EXPECT_EQ(Xxh3_64(Bytes("kvdn")), 0x6f2a14224060aee2ull);
  EXPECT_EQ(Xxh3_128(Bytes("kvdn")).ToHex(), "f2b8f102e1340ad862aea85f091c27f1");
}

TEST(GoldenTest, ModelFingerprints) {
  ModelSpec llama{"meta-llama/Meta-Llama-3-8B", 32, 8, 128, Dtype::kBFloat16, 256};
  EXPECT_EQ(ModelFingerprint(llama), 0xcb49a461c74294f0ull);
  ModelSpec small{"kvdn-golden", 2, 2, 8, Dtype::kFloat16, 4};
  EXPECT_EQ(ModelFingerprint(small), 0x3e74665d2cff6163ull);
}

TEST(GoldenTest, PrefixChainsAndKeys) {
  const ModelSpec spec{"kvdn-golden", 2, 2, 8, Dtype::kFloat16, 4};
  const std::vector<int32_t> tokens = {1, 2, 3, 4, 128000, 6, -1, 8, 9, 10};
  const std::vector<std::pair<std::string, std::vector<std::string>>> want = {
      {"default",
       {"default/3e74665d2cff6163/ffcc4d4187e890bead2a98f4a1879ddc",
        "default/3e74665d2cff6163/6e6090d46592c16ad59a9ed9ae8c9f1f",
        "default/3e74665d2cff6163/d6f6baaa066eae1440c0dfce4c8de74b"}},
      {"tenant-b",
       {"tenant-b/3e74665d2cff6163/f57e033f9e2d5f66f5cd12bd4134be31",
        "tenant-b/3e74665d2cff6163/5135036ede8ced9aa7c3c87a699649ef",
        "tenant-b/3e74665d2cff6163/e5c5554bf901e1dc7945c9156b0ab11a"}},
  };
  for (const auto& [ns, keys] : want) {
    auto got = ChunkKeysForTokens(ns, spec, tokens, /*include_tail=*/true);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->size(), keys.size());
    for (size_t i = 0; i < keys.size(); ++i) {
      EXPECT_EQ((*got)[i].ToString(), keys[i]) << ns << " chunk " << i;
      auto parsed = ChunkKey::Parse(keys[i]);
      ASSERT_TRUE(parsed.ok()) << parsed.status();
      EXPECT_EQ(*parsed, (*got)[i]);
    }
    // Without the tail only the two full chunks are keyed, with the same hashes.
    auto full = ChunkKeysForTokens(ns, spec, tokens, /*include_tail=*/false);
    ASSERT_TRUE(full.ok());
    ASSERT_EQ(full->size(), 2u);
    EXPECT_EQ((*full)[1].ToString(), keys[1]);
  }
}

TEST(GoldenTest, EncodedChunkBytes) {
  const std::string want_hex =
      "4b56444e0100010001000000010000000200000001000000080000000000000097222316ea17f216000000000000"
      "000000000000000000008ef311ab69a502460102030405060708";
  const ChunkInfo info{Dtype::kFloat16, 1, 1, 2, 1};
  const std::vector<uint8_t> payload = {1, 2, 3, 4, 5, 6, 7, 8};
  auto encoded = EncodeChunk(info, payload);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_EQ(absl::BytesToHexString(
                absl::string_view(reinterpret_cast<const char*>(encoded->data()), encoded->size())),
            want_hex);
  auto view = DecodeChunk(*encoded);
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(view->header.info, info);
}

}  // namespace
}  // namespace kvdn
