#include "kvdn/proto/get_frames.h"

#include <grpcpp/support/slice.h>

#include <vector>

#include "absl/strings/str_cat.h"

namespace kvdn::proto {
namespace {

// GetResponse's fields (kv_service.proto) and protobuf's wire types.
constexpr uint32_t kSizeField = 1;
constexpr uint32_t kDataField = 2;
constexpr uint32_t kTierField = 3;
constexpr uint32_t kVarint = 0;
constexpr uint32_t kFixed64 = 1;
constexpr uint32_t kLengthDelimited = 2;
constexpr uint32_t kFixed32 = 5;

uint8_t* PutVarint(uint64_t v, uint8_t* p) {
  while (v >= 0x80) {
    *p++ = static_cast<uint8_t>(v | 0x80);
    v >>= 7;
  }
  *p++ = static_cast<uint8_t>(v);
  return p;
}

// Reads bytes across the slices of one message.
class SliceReader {
 public:
  explicit SliceReader(const std::vector<grpc::Slice>& slices) : slices_(slices) { Skip0(); }
  bool done() const { return i_ == slices_.size(); }
  bool Byte(uint8_t* b) {
    if (done()) return false;
    *b = slices_[i_].begin()[off_++];
    Skip0();
    return true;
  }
  bool Varint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      uint8_t b;
      if (!Byte(&b)) return false;
      *v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) return true;
    }
    return false;
  }
  // Hands the next n bytes to fn (nullptr: skips them). False when fewer remain.
  bool Bytes(uint64_t n, absl::FunctionRef<void(const uint8_t*, size_t)>* fn) {
    while (n > 0) {
      if (done()) return false;
      const size_t avail = slices_[i_].size() - off_;
      const size_t take = static_cast<size_t>(std::min<uint64_t>(avail, n));
      if (fn) (*fn)(slices_[i_].begin() + off_, take);
      off_ += take;
      n -= take;
      Skip0();
    }
    return true;
  }

 private:
  // Moves past exhausted (and empty) slices.
  void Skip0() {
    while (i_ < slices_.size() && off_ == slices_[i_].size()) {
      ++i_;
      off_ = 0;
    }
  }
  const std::vector<grpc::Slice>& slices_;
  size_t i_ = 0;
  size_t off_ = 0;
};

// Walks the fields of the message in `r`, calling on_field(field, wire, value) for each:
// varint fields with their value, length-delimited ones with their length (on_field reads or
// skips exactly those bytes through `r`), fixed-size ones after skipping them (value 0).
// Malformed framing is `bad(what)`; on_field's first error is returned as it is.
template <typename OnField, typename Bad>
absl::Status WalkFields(SliceReader& r, OnField on_field, Bad bad) {
  while (!r.done()) {
    uint64_t tag;
    if (!r.Varint(&tag)) return bad("truncated field tag");
    const uint64_t field = tag >> 3;
    const uint32_t wire = static_cast<uint32_t>(tag & 7);
    if (field == 0) return bad("field number 0");
    uint64_t v = 0;
    switch (wire) {
      case kVarint:
        if (!r.Varint(&v)) return bad("truncated varint");
        break;
      case kFixed64:
      case kFixed32:
        if (!r.Bytes(wire == kFixed64 ? 8 : 4, nullptr)) return bad("truncated fixed field");
        break;
      case kLengthDelimited:
        if (!r.Varint(&v)) return bad("truncated length");
        break;
      default:
        return bad(absl::StrCat("wire type ", wire, " of field ", field));
    }
    if (absl::Status st = on_field(field, wire, v); !st.ok()) return st;
  }
  return absl::OkStatus();
}

absl::Status Malformed(absl::string_view what) {
  return absl::InternalError(absl::StrCat("malformed GetResponse from kvdnd: ", what));
}

absl::Status BadPut(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("malformed PutRequest: ", what));
}

}  // namespace

size_t EncodeGetFrameHeader(bool first, uint64_t size, v1::Tier tier, size_t data_len,
                            uint8_t* out) {
  uint8_t* p = out;
  if (first) {
    if (size != 0) {
      p = PutVarint(kSizeField << 3 | kVarint, p);
      p = PutVarint(size, p);
    }
    if (tier != 0) {
      p = PutVarint(kTierField << 3 | kVarint, p);
      // Enums are int32 on the wire, sign-extended to 64 bits when negative.
      p = PutVarint(static_cast<uint64_t>(static_cast<int64_t>(tier)), p);
    }
  }
  if (data_len != 0) {
    p = PutVarint(kDataField << 3 | kLengthDelimited, p);
    p = PutVarint(data_len, p);
  }
  return static_cast<size_t>(p - out);
}

absl::Status ParseGetFrame(const grpc::ByteBuffer& message, GetFrameFields* fields,
                           absl::FunctionRef<void(const uint8_t* data, size_t n)> on_data) {
  std::vector<grpc::Slice> slices;
  if (!message.Dump(&slices).ok()) return Malformed("unreadable message buffer");
  SliceReader r(slices);
  bool saw_data = false;
  auto on_field = [&](uint64_t field, uint32_t wire, uint64_t v) -> absl::Status {
    if ((field == kSizeField || field == kTierField) && wire != kVarint) {
      return Malformed(absl::StrCat("field ", field, " with wire type ", wire));
    }
    if (field == kDataField && wire != kLengthDelimited) {
      return Malformed(absl::StrCat("data field with wire type ", wire));
    }
    if (field == kSizeField) {
      fields->has_size = v != 0;
      fields->size = v;
    } else if (field == kTierField) {
      fields->tier = static_cast<int>(static_cast<int32_t>(v));
    } else if (field == kDataField) {
      if (saw_data) return Malformed("data field twice in one message");
      saw_data = true;
      absl::FunctionRef<void(const uint8_t*, size_t)> fn = on_data;
      if (!r.Bytes(v, &fn)) return Malformed("data field runs past the message");
    } else if (wire == kLengthDelimited && !r.Bytes(v, nullptr)) {
      return Malformed("field runs past the message");
    }
    return absl::OkStatus();
  };
  return WalkFields(r, on_field, Malformed);
}

size_t EncodePutDataFrameHeader(size_t data_len, uint8_t* out) {
  uint8_t* p = PutVarint(kDataField << 3 | kLengthDelimited, out);  // PutRequest.data is field 2
  p = PutVarint(data_len, p);
  return static_cast<size_t>(p - out);
}

absl::StatusOr<PutFrameKind> ParsePutFrame(
    const grpc::ByteBuffer& message, std::string* header, uint64_t* data_len,
    absl::FunctionRef<void(const uint8_t* data, size_t n)> on_data) {
  // PutRequest's oneof fields (kv_service.proto).
  constexpr uint32_t kHeaderField = 1;
  constexpr uint32_t kPutDataField = 2;
  constexpr uint64_t kMaxHeaderBytes = 4096;
  std::vector<grpc::Slice> slices;
  if (!message.Dump(&slices).ok()) return BadPut("unreadable message buffer");
  SliceReader r(slices);
  PutFrameKind kind = PutFrameKind::kEmpty;
  auto append = [&](const uint8_t* d, size_t n) {
    header->append(reinterpret_cast<const char*>(d), n);
  };
  auto on_field = [&](uint64_t field, uint32_t wire, uint64_t v) -> absl::Status {
    if (field != kHeaderField && field != kPutDataField) {  // unknown: skipped
      if (wire == kLengthDelimited && !r.Bytes(v, nullptr)) {
        return BadPut("field runs past the message");
      }
      return absl::OkStatus();
    }
    if (wire != kLengthDelimited) {
      return BadPut(absl::StrCat("field ", field, " with wire type ", wire));
    }
    if (kind != PutFrameKind::kEmpty) {
      return BadPut("a message carries one header or one data field, not two fields");
    }
    if (field == kHeaderField) {
      kind = PutFrameKind::kHeader;
      if (v > kMaxHeaderBytes) {
        return BadPut(absl::StrCat("header of ", v, " bytes (at most ", kMaxHeaderBytes, ")"));
      }
      header->clear();
      absl::FunctionRef<void(const uint8_t*, size_t)> fn = append;
      if (!r.Bytes(v, &fn)) return BadPut("header runs past the message");
    } else {
      kind = PutFrameKind::kData;
      *data_len = v;
      absl::FunctionRef<void(const uint8_t*, size_t)> fn = on_data;
      if (!r.Bytes(v, &fn)) return BadPut("data runs past the message");
    }
    return absl::OkStatus();
  };
  if (absl::Status st = WalkFields(r, on_field, BadPut); !st.ok()) return st;
  return kind;
}

}  // namespace kvdn::proto
