#include "kvdn/common/chunk_format.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kvdn/common/hash.h"

namespace kvdn {
namespace {

constexpr size_t kHeaderChecksumOffset = 56;

void PutU16(uint8_t* p, uint16_t v) { StoreLe(p, v); }
void PutU32(uint8_t* p, uint32_t v) { StoreLe(p, v); }
void PutU64(uint8_t* p, uint64_t v) { StoreLe(p, v); }
uint16_t GetU16(const uint8_t* p) { return LoadLe<uint16_t>(p); }
uint32_t GetU32(const uint8_t* p) { return LoadLe<uint32_t>(p); }
uint64_t GetU64(const uint8_t* p) { return LoadLe<uint64_t>(p); }

absl::Status CheckField(absl::string_view name, uint64_t v, uint64_t hi) {
  if (v == 0 || v > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk ", name, " is ", v, ", must be in [1, ", hi, "]"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ChunkInfo::Validate() const {
  if (!IsValidDtype(static_cast<uint8_t>(dtype))) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk dtype code ", static_cast<int>(dtype), " is not a known dtype"));
  }
  KVDN_RETURN_IF_ERROR(CheckField("num_layers", num_layers, kMaxChunkLayers));
  KVDN_RETURN_IF_ERROR(CheckField("num_kv_heads", num_kv_heads, kMaxChunkKvHeads));
  KVDN_RETURN_IF_ERROR(CheckField("head_dim", head_dim, kMaxChunkHeadDim));
  KVDN_RETURN_IF_ERROR(CheckField("num_tokens", num_tokens, kMaxChunkTokens));
  if (PayloadBytes() > kMaxChunkPayloadBytes) {
    return absl::InvalidArgumentError(absl::StrCat("chunk payload of ", PayloadBytes(),
                                                   " bytes is oversized; the limit is ",
                                                   kMaxChunkPayloadBytes));
  }
  return absl::OkStatus();
}

uint64_t ChunkInfo::LayerBytes() const {
  return uint64_t{2} * num_tokens * num_kv_heads * head_dim * DtypeSize(dtype);
}

uint64_t ChunkInfo::PayloadBytes() const { return LayerBytes() * num_layers; }

void WriteChunkHeader(const ChunkInfo& info, uint64_t payload_checksum, MutableByteSpan out) {
  uint8_t* p = out.data();
  std::memset(p, 0, kChunkHeaderBytes);
  PutU32(p + 0, kChunkMagic);
  PutU16(p + 4, kChunkFormatVersion);
  p[6] = static_cast<uint8_t>(info.dtype);
  p[7] = 0;
  PutU32(p + 8, info.num_layers);
  PutU32(p + 12, info.num_kv_heads);
  PutU32(p + 16, info.head_dim);
  PutU32(p + 20, info.num_tokens);
  PutU64(p + 24, info.PayloadBytes());
  PutU64(p + 32, payload_checksum);
  PutU64(p + kHeaderChecksumOffset, Xxh3_64(ByteSpan(p, kHeaderChecksumOffset)));
}

absl::Status EncodeChunk(const ChunkInfo& info, ByteSpan payload, MutableByteSpan out) {
  KVDN_RETURN_IF_ERROR(info.Validate());
  if (payload.size() != info.PayloadBytes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "payload is ", payload.size(), " bytes, the chunk shape needs ", info.PayloadBytes()));
  }
  if (out.size() != info.EncodedBytes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "output buffer is ", out.size(), " bytes, the encoded chunk is ", info.EncodedBytes()));
  }
  WriteChunkHeader(info, Xxh3_64(payload), out);
  if (!payload.empty()) std::memcpy(out.data() + kChunkHeaderBytes, payload.data(), payload.size());
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint8_t>> EncodeChunk(const ChunkInfo& info, ByteSpan payload) {
  KVDN_RETURN_IF_ERROR(info.Validate());
  std::vector<uint8_t> out(info.EncodedBytes());
  KVDN_RETURN_IF_ERROR(EncodeChunk(info, payload, MutableByteSpan(out)));
  return out;
}

absl::StatusOr<ChunkHeader> DecodeChunkHeader(ByteSpan data) {
  if (data.size() < kChunkHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk truncated: ", data.size(), " bytes, a header alone is ", kChunkHeaderBytes));
  }
  const uint8_t* p = data.data();
  const uint32_t magic = GetU32(p);
  if (magic != kChunkMagic) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "chunk has wrong magic 0x%08x, expected 0x%08x (\"KVDN\")", magic, kChunkMagic));
  }
  const uint16_t version = GetU16(p + 4);
  if (version != kChunkFormatVersion) {
    return absl::InvalidArgumentError(absl::StrCat("chunk format version ", version,
                                                   " is not supported; this build reads version ",
                                                   kChunkFormatVersion));
  }
  const uint64_t stored = GetU64(p + kHeaderChecksumOffset);
  const uint64_t actual = Xxh3_64(ByteSpan(p, kHeaderChecksumOffset));
  if (stored != actual) {
    return absl::DataLossError(absl::StrFormat(
        "chunk header checksum mismatch: stored %016x, computed %016x", stored, actual));
  }
  if (p[7] != 0) {
    return absl::InvalidArgumentError(absl::StrCat("chunk flags are ", p[7], ", must be 0"));
  }
  for (size_t i = 40; i < kHeaderChecksumOffset; ++i) {
    if (p[i] != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk header reserved byte ", i, " is nonzero"));
    }
  }
  ChunkHeader h;
  h.info.dtype = static_cast<Dtype>(p[6]);
  h.info.num_layers = GetU32(p + 8);
  h.info.num_kv_heads = GetU32(p + 12);
  h.info.head_dim = GetU32(p + 16);
  h.info.num_tokens = GetU32(p + 20);
  h.payload_bytes = GetU64(p + 24);
  h.payload_checksum = GetU64(p + 32);
  KVDN_RETURN_IF_ERROR(h.info.Validate());
  if (h.payload_bytes != h.info.PayloadBytes()) {
    return absl::InvalidArgumentError(absl::StrCat("chunk header says payload_bytes ",
                                                   h.payload_bytes, " but its shape needs ",
                                                   h.info.PayloadBytes()));
  }
  return h;
}

absl::StatusOr<ChunkView> DecodeChunk(ByteSpan data, bool verify_payload) {
  KVDN_ASSIGN_OR_RETURN(ChunkHeader h, DecodeChunkHeader(data));
  const uint64_t want = kChunkHeaderBytes + h.payload_bytes;
  if (data.size() < want) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk truncated: ", data.size(), " bytes, header says ", want));
  }
  if (data.size() > want) {
    return absl::InvalidArgumentError(absl::StrCat("chunk oversized: ", data.size(),
                                                   " bytes, header says ", want, " (",
                                                   data.size() - want, " trailing bytes)"));
  }
  ChunkView view{h, data.subspan(kChunkHeaderBytes)};
  if (verify_payload) {
    const uint64_t actual = Xxh3_64(view.payload);
    if (actual != h.payload_checksum) {
      return absl::DataLossError(
          absl::StrFormat("chunk payload checksum mismatch: header says %016x, payload hashes to "
                          "%016x",
                          h.payload_checksum, actual));
    }
  }
  return view;
}

}  // namespace kvdn
