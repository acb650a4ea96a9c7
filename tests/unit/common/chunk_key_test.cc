#include "kvdn/common/chunk_key.h"

#include <random>

#include "absl/container/flat_hash_set.h"
#include "gtest/gtest.h"
#include "kvdn/testing/chunks.h"
#include "kvdn/testing/status_matchers.h"

namespace kvdn {
namespace {

using ::kvdn::testing::StatusIs;
using ::testing::HasSubstr;

ModelSpec Llama() {
  return ModelSpec{"meta-llama/Meta-Llama-3-8B", 32, 8, 128, Dtype::kBFloat16, 256};
}

std::vector<int32_t> RandomTokens(size_t n, uint64_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % 128256);
  return t;
}

TEST(NamespaceTest, Validation) {
  EXPECT_OK(ValidateNamespace("tenant-A_1.prod"));
  EXPECT_THAT(ValidateNamespace(""),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("empty")));
  EXPECT_THAT(ValidateNamespace(std::string(129, 'a')),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("129 characters")));
  EXPECT_THAT(ValidateNamespace("a/b"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("0x2f at position 1")));
  EXPECT_THAT(ValidateNamespace("sp ace"), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(ModelSpecTest, ValidationNamesTheField) {
  EXPECT_OK(Llama().Validate());
  ModelSpec s = Llama();
  s.num_layers = 0;
  EXPECT_THAT(s.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("num_layers")));
  s = Llama();
  s.head_dim = 100000;
  EXPECT_THAT(s.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("head_dim")));
  s = Llama();
  s.model_name.clear();
  EXPECT_THAT(s.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("model_name")));
  s = Llama();
  s.dtype = static_cast<Dtype>(9);
  EXPECT_THAT(s.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dtype")));
  EXPECT_EQ(Llama().BytesPerToken(), 131072u);  // 128 KiB per token: 32 MiB per 256-token chunk
}

TEST(FingerprintTest, EveryFieldMatters) {
  const uint64_t base = ModelFingerprint(Llama());
  std::vector<ModelSpec> variants(6, Llama());
  variants[0].model_name = "meta-llama/Meta-Llama-3-8B-Instruct";
  variants[1].num_layers = 31;
  variants[2].num_kv_heads = 4;
  variants[3].head_dim = 64;
  variants[4].dtype = Dtype::kFloat16;
  variants[5].tokens_per_chunk = 128;
  absl::flat_hash_set<uint64_t> seen = {base};
  for (const auto& v : variants) EXPECT_TRUE(seen.insert(ModelFingerprint(v)).second);
}

TEST(ChunkKeyTest, PrintParseRoundTripOnRandomKeys) {
  for (uint64_t i = 0; i < 500; ++i) {
    const ChunkKey k = testing::KeyFor(i, "ns-" + std::to_string(i % 7));
    ASSERT_OK_AND_ASSIGN(ChunkKey back, ChunkKey::Parse(k.ToString()));
    EXPECT_EQ(back, k);
  }
  ASSERT_OK_AND_ASSIGN(ChunkKey upper,
                       ChunkKey::Parse("ns/ABCDEF0123456789/0123456789ABCDEF0123456789ABCDEF"));
  EXPECT_EQ(upper.fingerprint, 0xabcdef0123456789ull);
}

TEST(ChunkKeyTest, ParseErrorsSayWhichPart) {
  const std::string h32(32, 'a'), f16(16, 'b');
  EXPECT_THAT(ChunkKey::Parse("nokey"), StatusIs(absl::StatusCode::kInvalidArgument,
                                                 HasSubstr("namespace/fp16hex/hash32hex")));
  EXPECT_THAT(ChunkKey::Parse("ns/" + h32), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ChunkKey::Parse("/" + f16 + "/" + h32),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("namespace is empty")));
  EXPECT_THAT(ChunkKey::Parse("ns/abc/" + h32),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("fingerprint must be 16")));
  EXPECT_THAT(ChunkKey::Parse("ns/" + std::string(15, 'b') + "x/" + h32),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("fingerprint has a non-hex")));
  EXPECT_THAT(ChunkKey::Parse("ns/" + f16 + "/" + h32 + "0"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("hash must be 32")));
  EXPECT_THAT(ChunkKey::Parse("a/b/" + f16 + "/" + h32),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(PrefixChainTest, SharedPrefixesShareKeysAndDivergeAfter) {
  const auto a = RandomTokens(256 * 6, 1);
  auto b = a;
  b[256 * 3 + 17] += 1;  // diverge inside chunk 3
  ASSERT_OK_AND_ASSIGN(auto ka, ChunkKeysForTokens("default", Llama(), a));
  ASSERT_OK_AND_ASSIGN(auto kb, ChunkKeysForTokens("default", Llama(), b));
  ASSERT_EQ(ka.size(), 6u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(ka[i], kb[i]);
  for (int i = 3; i < 6; ++i) EXPECT_NE(ka[i], kb[i]);
}

TEST(PrefixChainTest, NamespacesAndModelsNeverShareKeys) {
  const auto t = RandomTokens(512, 2);
  ASSERT_OK_AND_ASSIGN(auto a, ChunkKeysForTokens("tenant-a", Llama(), t));
  ASSERT_OK_AND_ASSIGN(auto b, ChunkKeysForTokens("tenant-b", Llama(), t));
  ModelSpec other = Llama();
  other.model_name = "other";
  ASSERT_OK_AND_ASSIGN(auto c, ChunkKeysForTokens("tenant-a", other, t));
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_NE(a[i].prefix_hash, b[i].prefix_hash);
    EXPECT_NE(a[i].prefix_hash, c[i].prefix_hash);
  }
}

TEST(PrefixChainTest, TailChunkOnlyWhenAsked) {
  const auto t = RandomTokens(256 * 2 + 10, 3);
  ASSERT_OK_AND_ASSIGN(auto no_tail, ChunkKeysForTokens("d", Llama(), t));
  ASSERT_OK_AND_ASSIGN(auto tail, ChunkKeysForTokens("d", Llama(), t, true));
  EXPECT_EQ(no_tail.size(), 2u);
  EXPECT_EQ(tail.size(), 3u);
  EXPECT_EQ(tail[2].prefix_hash,
            ChainNext(tail[1].prefix_hash, absl::MakeConstSpan(t).subspan(512, 10)));
  ASSERT_OK_AND_ASSIGN(auto empty, ChunkKeysForTokens("d", Llama(), {}, true));
  EXPECT_TRUE(empty.empty());
}

TEST(PrefixChainTest, RejectsBadNamespaceAndSpec) {
  EXPECT_THAT(ChunkKeysForTokens("bad ns", Llama(), {}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ModelSpec bad = Llama();
  bad.tokens_per_chunk = 0;
  EXPECT_THAT(ChunkKeysForTokens("ns", bad, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tokens_per_chunk")));
}

}  // namespace
}  // namespace kvdn
