// Chunk identity: the model fingerprint, the prefix hash chain and ChunkKey (ARCHITECTURE.md, "Data
// model"). These definitions are a wire contract: every client in every language must produce the
// same bytes, so each hash input is spelled out below, and golden vectors pin them in the tests.
//
//   fingerprint = XXH3-64( u32le(len(model_name)) || model_name || u32le(num_layers) ||
//                          u32le(num_kv_heads) || u32le(head_dim) || u32le(dtype code) ||
//                          u32le(tokens_per_chunk) || u32le(chunk format version) )
//   h_0 = XXH3-128( u32le(len(namespace)) || namespace || u64le(fingerprint) )
//   h_i = XXH3-128( canonical(h_{i-1}) || token ids of chunk i as little-endian int32 )
//
// canonical(h) is the 16-byte big-endian form of Hash128. All XXH3 calls use seed 0.
// Printable ChunkKey: "<namespace>/<fingerprint as 16 hex>/<h_i as 32 hex>", lowercase hex.
#ifndef KVDN_COMMON_CHUNK_KEY_H_
#define KVDN_COMMON_CHUNK_KEY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kvdn/common/hash.h"
#include "kvdn/common/status.h"

namespace kvdn {

// Element types of KV tensors. The numeric codes are part of the chunk format and the fingerprint.
enum class Dtype : uint8_t {
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat32 = 3,
  kFloat8E4M3 = 4,
  kFloat8E5M2 = 5,
};

// Bytes per element; 0 for a code that is not a Dtype.
size_t DtypeSize(Dtype dtype);
bool IsValidDtype(uint8_t code);
absl::string_view DtypeName(Dtype dtype);

// Limits on namespaces (tenants): 1..kMaxNamespaceLength characters of [A-Za-z0-9._-].
inline constexpr size_t kMaxNamespaceLength = 128;
// Returns INVALID_ARGUMENT saying what is wrong with `ns`, or OK.
absl::Status ValidateNamespace(absl::string_view ns);

// What makes two engines' KV interchangeable.
struct ModelSpec {
  std::string model_name;
  uint32_t num_layers = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  Dtype dtype = Dtype::kBFloat16;
  uint32_t tokens_per_chunk = 256;

  // INVALID_ARGUMENT naming the field that is out of range.
  absl::Status Validate() const;
  // KV bytes of one token across all layers (K and V).
  uint64_t BytesPerToken() const;
};

// The 64-bit model fingerprint (see the header comment). REQUIRES: spec.Validate().ok().
uint64_t ModelFingerprint(const ModelSpec& spec);

// Identity of one stored chunk. Lookups never cross namespaces.
struct ChunkKey {
  std::string ns;
  uint64_t fingerprint = 0;
  Hash128 prefix_hash;

  std::string ToString() const;
  // Parses the printable form; INVALID_ARGUMENT saying which part is malformed.
  static absl::StatusOr<ChunkKey> Parse(absl::string_view text);

  friend bool operator==(const ChunkKey&, const ChunkKey&) = default;
  template <typename H>
  friend H AbslHashValue(H h, const ChunkKey& k) {
    return H::combine(std::move(h), k.ns, k.fingerprint, k.prefix_hash);
  }
};

// h_0 of the chain for (namespace, fingerprint).
Hash128 ChainSeed(absl::string_view ns, uint64_t fingerprint);
// h_i from h_{i-1} and the token ids of chunk i.
Hash128 ChainNext(const Hash128& prev, absl::Span<const int32_t> chunk_tokens);

// The keys of the chunks that cover `tokens`: one per full chunk of spec.tokens_per_chunk tokens,
// plus one for a partial tail chunk when `include_tail` is set and tokens.size() is not a multiple.
// INVALID_ARGUMENT when the namespace or spec is invalid.
absl::StatusOr<std::vector<ChunkKey>> ChunkKeysForTokens(absl::string_view ns,
                                                         const ModelSpec& spec,
                                                         absl::Span<const int32_t> tokens,
                                                         bool include_tail = false);

}  // namespace kvdn

#endif  // KVDN_COMMON_CHUNK_KEY_H_
