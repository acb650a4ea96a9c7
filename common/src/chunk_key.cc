#include "kvdn/common/chunk_key.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kvdn/common/chunk_format.h"

namespace kvdn {
namespace {

template <typename T>
void AppendLe(std::string& out, T v) {
  uint8_t b[sizeof(T)];
  StoreLe(b, v);
  out.append(reinterpret_cast<const char*>(b), sizeof(T));
}
void AppendU32(std::string& out, uint32_t v) { AppendLe(out, v); }
void AppendU64(std::string& out, uint64_t v) { AppendLe(out, v); }
bool IsNamespaceChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

absl::Status CheckRange(absl::string_view field, uint64_t v, uint64_t lo, uint64_t hi) {
  if (v < lo || v > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("model spec: ", field, " is ", v, ", must be in [", lo, ", ", hi, "]"));
  }
  return absl::OkStatus();
}

}  // namespace

size_t DtypeSize(Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat16:
    case Dtype::kBFloat16:
      return 2;
    case Dtype::kFloat32:
      return 4;
    case Dtype::kFloat8E4M3:
    case Dtype::kFloat8E5M2:
      return 1;
  }
  return 0;
}

bool IsValidDtype(uint8_t code) { return code >= 1 && code <= 5; }

absl::string_view DtypeName(Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat16:
      return "float16";
    case Dtype::kBFloat16:
      return "bfloat16";
    case Dtype::kFloat32:
      return "float32";
    case Dtype::kFloat8E4M3:
      return "float8_e4m3";
    case Dtype::kFloat8E5M2:
      return "float8_e5m2";
  }
  return "invalid";
}

absl::Status ValidateNamespace(absl::string_view ns) {
  if (ns.empty()) return absl::InvalidArgumentError("namespace is empty");
  if (ns.size() > kMaxNamespaceLength) {
    return absl::InvalidArgumentError(absl::StrCat(
        "namespace is ", ns.size(), " characters, the limit is ", kMaxNamespaceLength));
  }
  for (size_t i = 0; i < ns.size(); ++i) {
    if (!IsNamespaceChar(ns[i])) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "namespace has character 0x%02x at position %d; allowed are [A-Za-z0-9._-]",
          static_cast<unsigned char>(ns[i]), i));
    }
  }
  return absl::OkStatus();
}

absl::Status ModelSpec::Validate() const {
  if (model_name.empty()) return absl::InvalidArgumentError("model spec: model_name is empty");
  KVDN_RETURN_IF_ERROR(CheckRange("model_name length", model_name.size(), 1, 256));
  KVDN_RETURN_IF_ERROR(CheckRange("num_layers", num_layers, 1, kMaxChunkLayers));
  KVDN_RETURN_IF_ERROR(CheckRange("num_kv_heads", num_kv_heads, 1, kMaxChunkKvHeads));
  KVDN_RETURN_IF_ERROR(CheckRange("head_dim", head_dim, 1, kMaxChunkHeadDim));
  KVDN_RETURN_IF_ERROR(CheckRange("tokens_per_chunk", tokens_per_chunk, 1, kMaxChunkTokens));
  if (!IsValidDtype(static_cast<uint8_t>(dtype))) {
    return absl::InvalidArgumentError(
        absl::StrCat("model spec: dtype code ", static_cast<int>(dtype), " is not a known dtype"));
  }
  return absl::OkStatus();
}

uint64_t ModelSpec::BytesPerToken() const {
  return uint64_t{2} * num_layers * num_kv_heads * head_dim * DtypeSize(dtype);
}

uint64_t ModelFingerprint(const ModelSpec& spec) {
  std::string in;
  AppendU32(in, static_cast<uint32_t>(spec.model_name.size()));
  in += spec.model_name;
  AppendU32(in, spec.num_layers);
  AppendU32(in, spec.num_kv_heads);
  AppendU32(in, spec.head_dim);
  AppendU32(in, static_cast<uint32_t>(spec.dtype));
  AppendU32(in, spec.tokens_per_chunk);
  AppendU32(in, kChunkFormatVersion);
  return Xxh3_64(AsBytes(in));
}

std::string ChunkKey::ToString() const {
  return absl::StrFormat("%s/%016x/%s", ns, fingerprint, prefix_hash.ToHex());
}

absl::StatusOr<ChunkKey> ChunkKey::Parse(absl::string_view text) {
  const size_t first = text.find('/');
  const size_t last = text.rfind('/');
  if (first == absl::string_view::npos || first == last) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk key '", text.substr(0, 200), "' is not of the form namespace/fp16hex/hash32hex"));
  }
  ChunkKey key;
  key.ns = std::string(text.substr(0, first));
  if (absl::Status s = ValidateNamespace(key.ns); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("chunk key: ", s.message()));
  }
  KVDN_ASSIGN_OR_RETURN(key.fingerprint, ParseHex(text.substr(first + 1, last - first - 1), 16,
                                                  "chunk key: fingerprint"));
  auto hash = Hash128::FromHex(text.substr(last + 1));
  if (!hash.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("chunk key: ", hash.status().message()));
  }
  key.prefix_hash = *hash;
  return key;
}

Hash128 ChainSeed(absl::string_view ns, uint64_t fingerprint) {
  std::string in;
  AppendU32(in, static_cast<uint32_t>(ns.size()));
  in.append(ns.data(), ns.size());
  AppendU64(in, fingerprint);
  return Xxh3_128(AsBytes(in));
}

Hash128 ChainNext(const Hash128& prev, absl::Span<const int32_t> chunk_tokens) {
  std::string in;
  in.reserve(16 + 4 * chunk_tokens.size());
  const auto canon = prev.Canonical();
  in.append(reinterpret_cast<const char*>(canon.data()), canon.size());
  for (int32_t t : chunk_tokens) AppendU32(in, static_cast<uint32_t>(t));
  return Xxh3_128(AsBytes(in));
}

absl::StatusOr<std::vector<ChunkKey>> ChunkKeysForTokens(absl::string_view ns,
                                                         const ModelSpec& spec,
                                                         absl::Span<const int32_t> tokens,
                                                         bool include_tail) {
  KVDN_RETURN_IF_ERROR(ValidateNamespace(ns));
  KVDN_RETURN_IF_ERROR(spec.Validate());
  const uint64_t fp = ModelFingerprint(spec);
  const size_t per = spec.tokens_per_chunk;
  size_t n = tokens.size() / per;
  if (include_tail && tokens.size() % per != 0) ++n;
  std::vector<ChunkKey> keys;
  keys.reserve(n);
  Hash128 h = ChainSeed(ns, fp);
  for (size_t i = 0; i < n; ++i) {
    const size_t begin = i * per;
    const size_t len = std::min(per, tokens.size() - begin);
    h = ChainNext(h, tokens.subspan(begin, len));
    keys.push_back(ChunkKey{std::string(ns), fp, h});
  }
  return keys;
}

}  // namespace kvdn
